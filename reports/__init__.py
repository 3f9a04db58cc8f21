"""diffablate.reports."""
