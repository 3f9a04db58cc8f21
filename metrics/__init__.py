"""diffablate.metrics."""
