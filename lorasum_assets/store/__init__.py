"""The history store, and the only place that speaks SQL to it. No dagster imports.

The history is a DuckLake (``lake.py``): a catalog database plus Parquet data files, read and
written by many processes and machines at once; readers never block writers. Asset tables keep
one set of rows per materialization, keyed by the Dagster run that wrote it, behind a view of
the newest one. History tables are append-only and keyed by the run id: every write for a run is
one transaction that first deletes that run's rows, so a retried run replaces its own rows and
never duplicates them.
"""

from lorasum_assets.store.lake import HistoryLocation, history_location, open_history

__all__ = ["HistoryLocation", "history_location", "open_history"]
