"""Schema, versioned.

Versions 1 and 2 were single DuckDB files; ``migrate_file`` still brings such a file up to v2,
so that ``legacy.import_legacy_file`` can copy it into the DuckLake history. Version 3 is v2's tables and
views in DuckLake, without key constraints (DuckLake has none: every write deletes the rows it
replaces first, in the same transaction). ``ensure_lake_schema`` creates it; later versions go in
``LAKE_MIGRATIONS``. v4 adds the promotion registry: ``promotions`` (append-only, one row per
decision), the view ``production_adapters``, ``champion_examples`` and ``eval_scope`` (what a
decision pairs scores by).
"""

from __future__ import annotations

from functools import cache

from lorasum_assets.store.transactions import in_transaction

LEGACY_VERSION = 2
LAKE_BASE_VERSION = 3
SCHEMA_VERSION = 4
# Statements that upgrade the DuckLake history from version k - 1 to k, keyed by k (> 3).
LAKE_MIGRATIONS: dict[int, list[str]] = {
    # New tables only: a column added with ALTER TABLE to a table with inlined rows reads back as
    # NULL in other processes (DuckLake 0.3, seen with the SQLite catalog).
    4: [
        # The data source an evaluation's examples came from, and a hash of its generation settings:
        # a champion's scores pair with a challenger's only on the same examples, generated alike.
        "CREATE TABLE IF NOT EXISTS eval_scope (run_id VARCHAR, dataset VARCHAR, generation_hash VARCHAR)",
        # The production adapter scored by a promotion step on one evaluation run's examples.
        """CREATE TABLE IF NOT EXISTS champion_examples (
            run_id VARCHAR, adapter_id VARCHAR, id VARCHAR, prediction VARCHAR, new_tokens INTEGER, hit_limit BOOLEAN,
            bertscore_precision DOUBLE, bertscore_recall DOUBLE, bertscore_f1 DOUBLE, rouge1 DOUBLE, rouge2 DOUBLE,
            rougeL DOUBLE, rougeLsum DOUBLE, scorer_hash VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS promotions (
            promotion_id BIGINT, decided_at TIMESTAMP, alias VARCHAR, base_model VARCHAR, dataset VARCHAR,
            adapter_id VARCHAR, previous_adapter_id VARCHAR, moved BOOLEAN, decision VARCHAR, run_id VARCHAR,
            metric VARCHAR, delta DOUBLE, ci_low DOUBLE, ci_high DOUBLE, margin DOUBLE, n_examples INTEGER,
            compared_with VARCHAR, reason VARCHAR)""",
        # One row, rewritten by every decision: two decisions committing at once then conflict,
        # and the later one is retried against the alias the earlier one left.
        "CREATE TABLE IF NOT EXISTS promotion_lock (holder VARCHAR, taken_at TIMESTAMP)",
        "INSERT INTO promotion_lock SELECT NULL, now() WHERE NOT EXISTS (SELECT 1 FROM promotion_lock)",
        """CREATE OR REPLACE VIEW production_adapters AS
            SELECT alias, base_model, dataset, adapter_id, previous_adapter_id, decision, reason, run_id,
                   promotion_id, decided_at
            FROM (SELECT *, row_number() OVER (PARTITION BY alias, base_model, dataset ORDER BY promotion_id DESC) AS newest
                  FROM promotions WHERE moved)
            WHERE newest = 1 AND adapter_id IS NOT NULL""",
    ]
}

# The append-only history: every row carries the run_id of the Dagster run that wrote it.
HISTORY_TABLES = (
    "eval_runs", "eval_scope", "eval_metrics", "eval_examples", "champion_examples", "adapters", "training_steps",
    "training_epochs", "run_failures", "promotions",
)

# Tables the assets write, one set of rows per materialization (keyed by the Dagster run that
# wrote it), with the asset they belong to. A view of the table's plain name shows the rows of
# the asset's newest successful materialization.
ASSET_TABLES = {
    "raw_dialogsum": "raw_dialogsum",
    "raw_dialogsum_quarantine": "raw_dialogsum",
    "filtered_split": "filtered_split",
    "tokenized_dataset": "tokenized_dataset",
    "tokenized_dataset_rejected": "tokenized_dataset",
    "base_predictions": "base_predictions",
    "tuned_predictions": "tuned_predictions",
}


def rows_table(table: str) -> str:
    """The physical table behind an asset table's view."""
    return f"{table}_by_run"


def _current_view(table: str, asset: str) -> str:
    return f"""CREATE OR REPLACE VIEW {table} AS
        SELECT * FROM {rows_table(table)}
        WHERE run_id = (SELECT run_id FROM materializations WHERE asset = '{asset}' ORDER BY materialized_at DESC LIMIT 1)"""


def _run_scoped_tables() -> list[str]:
    statements = [
        """CREATE TABLE materializations (
            asset VARCHAR, run_id VARCHAR, materialized_at TIMESTAMP, rows BIGINT, content_hash VARCHAR,
            data_version VARCHAR, PRIMARY KEY (asset, run_id))"""
    ]
    for table, asset in ASSET_TABLES.items():
        if table.endswith("_predictions"):
            statements.append(f"CREATE TABLE {rows_table(table)} AS SELECT run_id, * EXCLUDE (run_id) FROM {table}")
        else:
            statements.append(f"CREATE TABLE {rows_table(table)} AS SELECT 'legacy' AS run_id, * FROM {table}")
        if table == asset:
            statements.append(
                f"""INSERT INTO materializations
                    SELECT '{asset}', run_id, now(), count(*), NULL, NULL FROM {rows_table(table)} GROUP BY run_id"""
            )
    statements.append(f"ALTER TABLE {rows_table('raw_dialogsum_quarantine')} ADD COLUMN file VARCHAR")
    for table, asset in ASSET_TABLES.items():
        statements += [f"DROP TABLE {table}", _current_view(table, asset)]
    return statements


# Each entry upgrades from version i to i + 1 (index 0 creates version 1).
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE IF NOT EXISTS raw_dialogsum (
            split VARCHAR, id VARCHAR, dialogue VARCHAR, "references" VARCHAR[], topic VARCHAR,
            source_index INTEGER)""",
        """CREATE TABLE IF NOT EXISTS raw_dialogsum_quarantine (
            split VARCHAR, row_number INTEGER, id VARCHAR, reason VARCHAR, raw VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS filtered_split (
            split VARCHAR, id VARCHAR, dialogue VARCHAR, "references" VARCHAR[], topic VARCHAR,
            source_index INTEGER)""",
        """CREATE TABLE IF NOT EXISTS tokenized_dataset (
            split VARCHAR, id VARCHAR, input_ids INTEGER[], attention_mask TINYINT[], labels INTEGER[],
            n_tokens INTEGER, prompt_tokens INTEGER, label_tokens INTEGER, truncated BOOLEAN)""",
        """CREATE TABLE IF NOT EXISTS tokenized_dataset_rejected (
            split VARCHAR, id VARCHAR, reason VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS adapters (
            adapter_id VARCHAR PRIMARY KEY, run_id VARCHAR, train_key VARCHAR, base_model VARCHAR,
            base_revision VARCHAR, profile VARCHAR, config JSON, trainable_params BIGINT,
            total_params BIGINT, trainable_percent DOUBLE, final_train_loss DOUBLE,
            final_val_loss DOUBLE, dataset_hash VARCHAR, sha256 VARCHAR, path VARCHAR,
            created_at TIMESTAMP)""",
        """CREATE TABLE IF NOT EXISTS training_steps (
            train_key VARCHAR, run_id VARCHAR, step INTEGER, epoch DOUBLE, loss DOUBLE,
            learning_rate DOUBLE, grad_norm DOUBLE, label_tokens INTEGER, seconds DOUBLE,
            logged_at TIMESTAMP, PRIMARY KEY (train_key, step))""",
        """CREATE TABLE IF NOT EXISTS training_epochs (
            train_key VARCHAR, run_id VARCHAR, epoch INTEGER, val_loss DOUBLE,
            PRIMARY KEY (train_key, epoch))""",
        """CREATE TABLE IF NOT EXISTS base_predictions (
            split VARCHAR, id VARCHAR, prediction VARCHAR, new_tokens INTEGER, hit_limit BOOLEAN,
            latency_s DOUBLE, adapter_id VARCHAR, run_id VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS tuned_predictions (
            split VARCHAR, id VARCHAR, prediction VARCHAR, new_tokens INTEGER, hit_limit BOOLEAN,
            latency_s DOUBLE, adapter_id VARCHAR, run_id VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS eval_runs (
            run_id VARCHAR PRIMARY KEY, created_at TIMESTAMP, profile VARCHAR, params JSON,
            code_version VARCHAR, base_model VARCHAR, dataset_hash VARCHAR, split VARCHAR,
            n_examples INTEGER, adapter_id VARCHAR, adapter_sha256 VARCHAR, scorer_hash VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS eval_metrics (
            run_id VARCHAR, model VARCHAR, metric VARCHAR, reference_set VARCHAR, value DOUBLE,
            ci_low DOUBLE, ci_high DOUBLE, scorer_hash VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS eval_examples (
            run_id VARCHAR, model VARCHAR, id VARCHAR, prediction VARCHAR, new_tokens INTEGER,
            hit_limit BOOLEAN, bertscore_precision DOUBLE, bertscore_recall DOUBLE,
            bertscore_f1 DOUBLE, rouge1 DOUBLE, rouge2 DOUBLE, rougeL DOUBLE, rougeLsum DOUBLE,
            scorer_hash VARCHAR)""",
        """CREATE TABLE IF NOT EXISTS run_failures (
            run_id VARCHAR PRIMARY KEY, job_name VARCHAR, failed_at TIMESTAMP, error VARCHAR)""",
        """CREATE OR REPLACE VIEW eval_history AS
            SELECT r.created_at, m.run_id, r.profile, r.base_model, r.dataset_hash, r.split,
                   r.adapter_id, r.adapter_sha256, m.model, m.metric, m.reference_set, m.value,
                   m.ci_low, m.ci_high, m.scorer_hash, r.n_examples
            FROM eval_metrics m JOIN eval_runs r USING (run_id)""",
        """CREATE OR REPLACE VIEW bertscore_report AS
            SELECT * FROM eval_history
            WHERE run_id = (SELECT run_id FROM eval_runs ORDER BY created_at DESC LIMIT 1)""",
        """CREATE OR REPLACE VIEW best_adapters AS
            SELECT h.dataset_hash, h.scorer_hash, h.metric, h.reference_set, h.adapter_id,
                   h.adapter_sha256, h.run_id, h.value, h.ci_low, h.ci_high,
                   rank() OVER (PARTITION BY h.dataset_hash, h.scorer_hash, h.metric, h.reference_set
                                ORDER BY h.value DESC) AS rank
            FROM eval_history h WHERE h.model = 'tuned'""",
        """CREATE OR REPLACE VIEW tuned_worse_examples AS
            SELECT t.run_id, t.id, b.prediction AS base_prediction, t.prediction AS tuned_prediction,
                   b.bertscore_f1 AS base_f1, t.bertscore_f1 AS tuned_f1,
                   t.bertscore_f1 - b.bertscore_f1 AS f1_delta
            FROM eval_examples t JOIN eval_examples b
              ON t.run_id = b.run_id AND t.id = b.id AND t.model = 'tuned' AND b.model = 'base'
            WHERE t.bertscore_f1 < b.bertscore_f1""",
    ],
    # v2: asset tables keyed by the run that wrote them; training logs keyed by run; adapters
    # carry the fingerprint of the base they were trained on.
    [
        *_run_scoped_tables(),
        """CREATE TABLE training_steps_v2 (
            train_key VARCHAR, run_id VARCHAR, step INTEGER, epoch DOUBLE, loss DOUBLE,
            learning_rate DOUBLE, grad_norm DOUBLE, label_tokens INTEGER, seconds DOUBLE,
            logged_at TIMESTAMP, PRIMARY KEY (run_id, step))""",
        "INSERT INTO training_steps_v2 SELECT * FROM training_steps",
        "DROP TABLE training_steps",
        "ALTER TABLE training_steps_v2 RENAME TO training_steps",
        """CREATE TABLE training_epochs_v2 (
            train_key VARCHAR, run_id VARCHAR, epoch INTEGER, val_loss DOUBLE, PRIMARY KEY (run_id, epoch))""",
        "INSERT INTO training_epochs_v2 SELECT * FROM training_epochs",
        "DROP TABLE training_epochs",
        "ALTER TABLE training_epochs_v2 RENAME TO training_epochs",
        "ALTER TABLE adapters ADD COLUMN base_quantization VARCHAR",
        "ALTER TABLE adapters ADD COLUMN base_fingerprint VARCHAR",
        "ALTER TABLE adapters ADD COLUMN optimizer_steps INTEGER",
    ],
]


def current_version(con) -> int:
    exists = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() AND table_name = 'schema_version'"
    ).fetchone()[0]
    if not exists:
        return 0
    row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def migrate_file(con) -> int:
    """Bring a single-file DuckDB history of an older lorasum up to v2, each step in its own transaction."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, applied_at TIMESTAMP)")
    version = current_version(con)
    if version > LEGACY_VERSION:
        raise RuntimeError(f"database schema v{version} is newer than a single-file lorasum history (v{LEGACY_VERSION})")
    for target in range(version + 1, LEGACY_VERSION + 1):
        con.execute("BEGIN TRANSACTION")
        try:
            for statement in MIGRATIONS[target - 1]:
                con.execute(statement)
            con.execute("INSERT INTO schema_version VALUES (?, now())", [target])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    return LEGACY_VERSION


@cache
def lake_schema_statements() -> tuple[str, ...]:
    """The v3 tables and views, read off the v2 schema that the migrations above build."""
    import duckdb

    v2 = duckdb.connect()
    migrate_file(v2)
    statements = []
    tables = [r[0] for r in v2.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' ORDER BY table_oid").fetchall()]
    for table in tables:
        columns = v2.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ? ORDER BY column_index", [table]
        ).fetchall()
        statements.append(f"CREATE TABLE {table} ({', '.join(f'{chr(34)}{c}{chr(34)} {t}' for c, t in columns)})")
    # Views in the order they were created: a view may read one made before it.
    statements += [r[0] for r in v2.execute("SELECT sql FROM duckdb_views() WHERE NOT internal AND schema_name = 'main' ORDER BY view_oid").fetchall()]
    v2.close()
    return tuple(statements)


def ensure_lake_schema(con) -> int:
    """Create the v3 schema in an empty history, then apply the migrations it lacks.

    Each migration statement commits on its own, and each is safe to run again: DuckLake 0.3 loses
    the inlined-data tables of tables created in a transaction that also alters others. The
    version is recorded with the last statement. Two processes doing this at once: one commits,
    the other retries and finds it done.
    """
    def create(con) -> None:
        if current_version(con) == 0:
            for statement in lake_schema_statements():
                con.execute(statement)
            con.execute("INSERT INTO schema_version VALUES (?, now())", [LAKE_BASE_VERSION])

    version = current_version(con)
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"history schema v{version} is newer than this lorasum (v{SCHEMA_VERSION}); upgrade lorasum")
    if version == 0:
        in_transaction(con, create, "creating the history's tables")
    for target in range(current_version(con) + 1, SCHEMA_VERSION + 1):
        *statements, last = LAKE_MIGRATIONS[target]
        for statement in statements:
            in_transaction(con, lambda con, statement=statement: con.execute(statement), f"upgrading the history to v{target}")

        def finish(con, last=last, target=target) -> None:
            if current_version(con) < target:
                con.execute(last)
                con.execute("INSERT INTO schema_version VALUES (?, now())", [target])

        in_transaction(con, finish, f"upgrading the history to v{target}")
    return SCHEMA_VERSION
