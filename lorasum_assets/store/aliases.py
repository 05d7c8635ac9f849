"""The alias registry: which adapter holds an alias, the scores a decision pairs, and the
append-only record of every decision (``promotions``). No dagster.

An alias (``production``) is held per base model and dataset (the data source an evaluation's
examples came from). Every decision, automatic or by hand, is one transaction that first
rewrites the single row of ``promotion_lock``: two decisions committing at once conflict there,
and the later one is retried against the alias as the earlier one left it.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lorasum_assets.store.queries import checked_metric
from lorasum_assets.store.transactions import in_transaction
from lorasum_assets.store.writes import insert_rows, replace_rows

DECISIONS = ("promoted", "kept", "manual", "rollback")


@dataclass(frozen=True)
class AliasKey:
    alias: str
    base_model: str
    dataset: str

    def describe(self) -> str:
        return f"{self.alias} on {self.base_model} / {self.dataset}"


@dataclass(frozen=True)
class Evaluation:
    """One evaluation run of the history: what its examples and scores are comparable with."""

    run_id: str
    base_model: str
    dataset: str | None
    dataset_hash: str
    scorer_hash: str
    generation_hash: str | None
    split: str
    adapter_id: str
    n_examples: int


class ChampionChangedError(RuntimeError):
    """The alias moved while a decision was being made against its former holder."""

    def __init__(self, expected: str | None, current: str | None) -> None:
        super().__init__(f"the alias moved from {expected or 'no adapter'} to {current or 'no adapter'} meanwhile")
        self.current = current


class AliasError(ValueError):
    """A move of an alias by hand that cannot be made."""


def find_evaluation(con, run_id: str) -> Evaluation | None:
    row = con.execute(
        """SELECT run_id, r.base_model, s.dataset, r.dataset_hash, r.scorer_hash, s.generation_hash, r.split, r.adapter_id, r.n_examples
           FROM eval_runs r LEFT JOIN eval_scope s USING (run_id) WHERE run_id = ?""",
        [run_id],
    ).fetchone()
    return Evaluation(*row) if row else None


def example_scores(con, run_id: str, model: str, metric: str) -> dict[str, float]:
    """Per-example scores of one side (``base`` or ``tuned``) of one evaluation run."""
    rows = con.execute(f"SELECT id, {checked_metric(metric)} FROM eval_examples WHERE run_id = ? AND model = ?", [run_id, model]).fetchall()
    return {i: v for i, v in rows}


def champion_scores(con, adapter_id: str, evaluation: Evaluation, metric: str) -> dict[str, float] | None:
    """``adapter_id``'s per-example scores from the newest evaluation on the same examples, scorer,
    split and generation settings as ``evaluation``: as the tuned side of its own run, or as the
    champion scored by an earlier promotion step. None when it was never scored so."""
    metric = checked_metric(metric)
    rows = con.execute(
        f"""WITH scored AS (
                SELECT e.run_id, e.id, e.{metric} AS value, e.scorer_hash, 0 AS side FROM eval_examples e JOIN eval_runs r USING (run_id)
                WHERE e.model = 'tuned' AND r.adapter_id = $adapter
                UNION ALL
                SELECT run_id, id, {metric}, scorer_hash, 1 FROM champion_examples WHERE adapter_id = $adapter)
            SELECT x.run_id, x.id, x.value FROM scored x JOIN eval_runs r USING (run_id) LEFT JOIN eval_scope s USING (run_id)
            WHERE r.dataset_hash = $dataset_hash AND x.scorer_hash = $scorer AND r.split = $split
              AND s.generation_hash IS NOT DISTINCT FROM $generation
            ORDER BY r.created_at DESC, x.run_id, x.side""",
        {"adapter": adapter_id, "dataset_hash": evaluation.dataset_hash, "scorer": evaluation.scorer_hash,
         "split": evaluation.split, "generation": evaluation.generation_hash},
    ).fetchall()
    if not rows:
        return None
    newest = rows[0][0]
    return {i: v for run_id, i, v in rows if run_id == newest}


def write_champion_examples(con, run_id: str, adapter_id: str, rows: list[dict[str, Any]]) -> None:
    """The champion's predictions and scores on one evaluation run's examples."""

    key = {"run_id": run_id, "adapter_id": adapter_id}
    in_transaction(con, lambda con: replace_rows(con, "champion_examples", key, rows), "writing the champion's scores")


def current_adapter(con, key: AliasKey) -> str | None:
    row = con.execute(
        "SELECT adapter_id FROM production_adapters WHERE alias = ? AND base_model = ? AND dataset = ?",
        [key.alias, key.base_model, key.dataset],
    ).fetchone()
    return row[0] if row else None


def holders(con, alias: str, base_model: str | None = None) -> list[tuple[str, str, str, str]]:
    """(base_model, dataset, adapter_id, decided_at) of every key that ``alias`` is held on."""
    query = "SELECT base_model, dataset, adapter_id, decided_at FROM production_adapters WHERE alias = ?"
    params: list = [alias]
    if base_model is not None:
        query += " AND base_model = ?"
        params.append(base_model)
    return con.execute(query + " ORDER BY decided_at DESC", params).fetchall()


def _holding_order(con, key: AliasKey) -> list[str]:
    """The alias's holders as a stack: a promotion pushes, a rollback pops."""
    stack: list[str] = []
    for decision, adapter_id in con.execute(
        """SELECT decision, adapter_id FROM promotions WHERE moved AND alias = ? AND base_model = ? AND dataset = ?
           ORDER BY promotion_id""",
        [key.alias, key.base_model, key.dataset],
    ).fetchall():
        if decision == "rollback":
            if stack:
                stack.pop()
        elif adapter_id is not None:
            stack.append(adapter_id)
    return stack


def _append(con, key: AliasKey, holder: str, row: dict[str, Any]) -> dict[str, Any]:
    """Take the lock row, then append one decision; its previous_adapter_id is the alias's holder now."""
    con.execute("DELETE FROM promotion_lock")
    con.execute("INSERT INTO promotion_lock VALUES (?, now())", [holder])
    next_id = con.execute("SELECT coalesce(max(promotion_id), 0) + 1 FROM promotions").fetchone()[0]
    full = {
        "promotion_id": next_id, "decided_at": datetime.now(UTC).replace(tzinfo=None), "alias": key.alias,
        "base_model": key.base_model, "dataset": key.dataset, "previous_adapter_id": current_adapter(con, key),
        "run_id": None, "metric": None, "delta": None, "ci_low": None, "ci_high": None, "margin": None,
        "n_examples": None, "compared_with": None, **row,
    }
    insert_rows(con, "promotions", list(full), [list(full.values())])
    return full


def decision_of_run(con, key: AliasKey, run_id: str) -> dict[str, Any] | None:
    cursor = con.execute(
        "SELECT * FROM promotions WHERE run_id = ? AND alias = ? AND base_model = ? AND dataset = ? AND decision IN ('promoted', 'kept')",
        [run_id, key.alias, key.base_model, key.dataset],
    )
    row = cursor.fetchone()
    return dict(zip([d[0] for d in cursor.description], row)) if row else None


def record_decision(con, key: AliasKey, expected: str | None, row: dict[str, Any]) -> dict[str, Any]:
    """Append an automatic decision (``promoted`` moves the alias, ``kept`` does not), made against
    ``expected``, the holder the decision compared with. Raises ``ChampionChangedError`` when the
    alias has moved since. A run that already decided gets its earlier decision back."""

    def body(con) -> dict[str, Any]:
        earlier = decision_of_run(con, key, row["run_id"])
        if earlier is not None:
            return earlier
        current = current_adapter(con, key)
        if current != expected:
            raise ChampionChangedError(expected, current)
        return _append(con, key, row["run_id"], row)

    return in_transaction(con, body, "recording a promotion decision")


def move_alias(con, key: AliasKey, adapter_id: str | None, reason: str | None, rollback: bool = False,
               check_target: Callable[[str], object] | None = None) -> dict[str, Any]:
    """Move the alias by hand: to ``adapter_id``, or (``rollback``) back to the adapter that held it
    before the current one; recorded in ``promotions`` like any decision. ``check_target`` is called
    with the adapter the alias would move to (not for the base model alone); when it raises,
    nothing is written."""
    who = getpass.getuser()

    def body(con) -> dict[str, Any]:
        order = _holding_order(con, key)
        if rollback:
            if not order:
                raise AliasError(f"nothing to roll back: no adapter holds {key.describe()}")
            target = order[-2] if len(order) > 1 else None
            if target is not None and check_target is not None:
                check_target(target)
            text = reason or f"rolled back by {who} with lorasum rollback"
            return _append(con, key, who, {"adapter_id": target, "moved": True, "decision": "rollback", "reason": text})
        if order and order[-1] == adapter_id:
            raise AliasError(f"{adapter_id} already holds {key.describe()}")
        if adapter_id is not None and check_target is not None:
            check_target(adapter_id)
        text = reason or f"promoted by {who} with lorasum promote"
        return _append(con, key, who, {"adapter_id": adapter_id, "moved": True, "decision": "manual", "reason": text})

    return in_transaction(con, body, "moving an alias")


def adapter_dataset(con, adapter_id: str) -> str | None:
    """The dataset an adapter was last evaluated on: the key a promotion by hand moves."""
    row = con.execute(
        """SELECT s.dataset FROM eval_runs r JOIN eval_scope s USING (run_id)
           WHERE r.adapter_id = ? AND s.dataset IS NOT NULL ORDER BY r.created_at DESC LIMIT 1""",
        [adapter_id],
    ).fetchone()
    return row[0] if row else None
