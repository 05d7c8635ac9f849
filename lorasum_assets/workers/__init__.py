"""Programs that run outside the Dagster process and report back through Dagster Pipes."""
