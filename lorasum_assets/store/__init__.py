"""DuckDB storage: the schema, its migrations, and the writes. No dagster imports.

Current asset results live in one table per asset, replaced whole. History tables are
append-only and keyed by the Dagster run id: every write for a run is one transaction that first
deletes that run's rows, so a retried run replaces its own rows and never duplicates them.
"""
