"""The adapter registry: finding an adapter and checking that it fits the base model. No dagster."""

from __future__ import annotations

import json

from lorasum_assets.store.references import AdapterRef, BaseModelRef, check_adapter_base, version_of

_COLUMNS = "adapter_id, path, sha256, base_model, base_revision, base_quantization, base_fingerprint, config, run_id"


class AdapterChoiceError(ValueError):
    """No adapter, or not a usable one, for an evaluation."""


def _ref(row) -> AdapterRef:
    adapter_id, path, sha, model, revision, quantization, fingerprint, config, run_id = row
    base = BaseModelRef(model=model, revision=revision, quantization=quantization or "none", fingerprint=fingerprint or "")
    training = json.loads(config) if isinstance(config, str) else dict(config or {})
    return AdapterRef(adapter_id=adapter_id, path=path, sha256=sha, base=base, training=training, run_id=run_id,
                      data_version=version_of(sha, base, training))


def find_adapter(con, adapter_id: str) -> AdapterRef | None:
    row = con.execute(f"SELECT {_COLUMNS} FROM adapters WHERE adapter_id = ?", [adapter_id]).fetchone()
    return _ref(row) if row else None


def adapter_profile(con, adapter_id: str) -> str | None:
    """The profile the adapter was trained under: its model settings are how its base loads."""
    row = con.execute("SELECT profile FROM adapters WHERE adapter_id = ?", [adapter_id]).fetchone()
    return row[0] if row else None


def all_adapters(con) -> list[AdapterRef]:
    """Every registered adapter, newest first."""
    rows = con.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY created_at DESC").fetchall()
    return [_ref(row) for row in rows]


def newest_adapter_for_base(con, base: BaseModelRef) -> AdapterRef | None:
    row = con.execute(
        f"""SELECT {_COLUMNS} FROM adapters
            WHERE base_model = ? AND base_revision IS NOT DISTINCT FROM ? AND base_fingerprint = ?
            ORDER BY created_at DESC LIMIT 1""",
        [base.model, base.revision, base.fingerprint],
    ).fetchone()
    return _ref(row) if row else None


def production_adapter(con, key) -> AdapterRef | None:
    """The adapter holding ``key`` (an ``AliasKey``), if any."""
    from lorasum_assets.store.aliases import current_adapter

    adapter_id = current_adapter(con, key)
    return find_adapter(con, adapter_id) if adapter_id else None


# What the evaluate job's Launchpad shows by default: the choice described in ``choose_adapter``.
AUTO_ADAPTER = "auto"


def choose_adapter(
    con, base: BaseModelRef, adapter_id: str | None, from_lineage: AdapterRef | None, production: AdapterRef | None = None
) -> AdapterRef:
    """The adapter an evaluation applies: the one asked for by id, else (no id, or ``auto``) the one
    trained in the run's own lineage, else the production adapter, else the newest one trained on
    this base model. It must fit ``base``."""
    if adapter_id and adapter_id != AUTO_ADAPTER:
        ref = find_adapter(con, adapter_id)
        if ref is None:
            raise AdapterChoiceError(f"no adapter with id {adapter_id!r} in the registry; `lorasum adapters` lists them")
    elif from_lineage is not None:
        ref = from_lineage
    elif production is not None:
        ref = production
    else:
        ref = newest_adapter_for_base(con, base)
        if ref is None:
            raise AdapterChoiceError(f"no registered adapter was trained on {base.describe()}; materialize lora_adapter first")
    if not ref.base.fingerprint:
        raise AdapterChoiceError(
            f"adapter {ref.adapter_id} was registered without its base model's fingerprint (an older lorasum); retrain it"
        )
    check_adapter_base(ref.adapter_id, ref.base, base)
    return ref


def adapter_facts(con, adapter_id: str) -> dict | None:
    """What a model card says about an adapter: its training and its newest evaluation."""
    row = con.execute(
        """SELECT adapter_id, base_model, config, dataset_hash, final_train_loss, final_val_loss, sha256, path
           FROM adapters WHERE adapter_id = ?""",
        [adapter_id],
    ).fetchone()
    if row is None:
        return None
    facts = dict(zip(("adapter_id", "base_model", "training", "dataset_hash", "final_train_loss", "final_val_loss", "sha256", "path"), row))
    facts["training"] = json.loads(facts["training"]) if isinstance(facts["training"], str) else dict(facts["training"] or {})
    evaluation = con.execute(
        """SELECT run_id, r.n_examples, r.split, s.dataset FROM eval_runs r LEFT JOIN eval_scope s USING (run_id)
           WHERE r.adapter_id = ? ORDER BY r.created_at DESC LIMIT 1""",
        [adapter_id],
    ).fetchone()
    facts["metrics"] = []
    if evaluation:
        facts.update(eval_run_id=evaluation[0], n_examples=evaluation[1], split=evaluation[2], dataset=evaluation[3])
        for metric, base, tuned, low, high, delta, delta_low, delta_high in con.execute(
            """SELECT metric,
                      max(value) FILTER (WHERE model = 'base'), max(value) FILTER (WHERE model = 'tuned'),
                      max(ci_low) FILTER (WHERE model = 'tuned'), max(ci_high) FILTER (WHERE model = 'tuned'),
                      max(value) FILTER (WHERE model = 'delta'), max(ci_low) FILTER (WHERE model = 'delta'),
                      max(ci_high) FILTER (WHERE model = 'delta')
               FROM eval_metrics WHERE run_id = ? AND reference_set = 'all' GROUP BY metric ORDER BY metric""",
            [evaluation[0]],
        ).fetchall():
            facts["metrics"].append(dict(metric=metric, base=base, tuned=tuned, tuned_low=low, tuned_high=high,
                                         delta=delta, delta_low=delta_low, delta_high=delta_high))
    return facts
