"""diffablate.models."""
