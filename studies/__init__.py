"""diffablate.studies."""
