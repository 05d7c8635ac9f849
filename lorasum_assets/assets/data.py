"""raw_dialogsum → filtered_split → tokenized_dataset."""

import hashlib
import json
from collections import Counter

import dagster as dg

from lorasum_assets.assets.plots import histogram, markdown_table
from lorasum_assets.ml.data import (
    Dialogue,
    FilterSpec,
    filter_split,
    normalise,
    read_hub,
    read_local,
    read_sample,
)
from lorasum_assets.ml.prompts import IGNORE_INDEX, SummaryTooLongError, encode_example
from lorasum_assets.profiles import get_profile, with_overrides
from lorasum_assets.resources import LoraModelResource, LorasumStore
from lorasum_assets.store.history import replace_table

DIALOGUE_COLUMNS = ("split", "id", "dialogue", "references", "topic", "source_index")


class RawDataConfig(dg.Config):
    """Where DialogSum comes from. Unset fields take the profile's value."""

    source: str | None = None  # sample | hub | local
    path: str | None = None
    hub_dataset: str | None = None
    hub_revision: str | None = None


class FilterConfig(dg.Config):
    """The notebook keeps ``index % 100 == 0`` of each split. Unset fields take the profile's value."""

    modulus: int | None = None
    offset: int | None = None
    max_rows_per_split: int | None = None
    random_sample: int | None = None
    seed: int | None = None


class TokenizeConfig(dg.Config):
    max_length: int | None = None
    use_chat_template: bool | None = None


def _dialogue_rows(dialogues: list[Dialogue]) -> list[tuple]:
    return [(d.split, d.id, d.dialogue, d.references, d.topic, d.source_index) for d in dialogues]


def read_dialogues(con, table: str, split: str | None = None) -> list[Dialogue]:
    query = f'SELECT split, id, dialogue, "references", topic, source_index FROM {table}'
    params: list = []
    if split is not None:
        query += " WHERE split = ?"
        params.append(split)
    query += " ORDER BY split, source_index"
    return [Dialogue(s, i, d, list(r), t, int(x)) for s, i, d, r, t, x in con.execute(query, params).fetchall()]


def _hash_rows(rows) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, default=str, ensure_ascii=False).encode())
    return digest.hexdigest()


@dg.asset(
    group_name="data",
    kinds={"python", "duckdb"},
    code_version="1",
    description="Every DialogSum dialogue as it arrived, one row per dialogue with a list of references.",
)
def raw_dialogsum(context: dg.AssetExecutionContext, config: RawDataConfig, store: LorasumStore) -> dg.MaterializeResult:
    profile = get_profile()
    data = with_overrides(profile.data, {k: v for k, v in config.model_dump().items()})
    if data.source == "sample":
        by_split, source = read_sample(), "sample"
    elif data.source == "local":
        if not data.path:
            raise ValueError("source 'local' needs a path")
        by_split, source = read_local(data.path), f"local:{data.path}"
    elif data.source == "hub":
        by_split = read_hub(data.hub_dataset, data.hub_revision)
        source = f"hub:{data.hub_dataset}@{data.hub_revision or 'main'}"
    else:
        raise ValueError(f"unknown data source {data.source!r}; use sample, hub or local")
    loaded = normalise(by_split, source)
    with store.connect() as con:
        replace_table(con, "raw_dialogsum", DIALOGUE_COLUMNS, _dialogue_rows(loaded.dialogues))
        replace_table(
            con,
            "raw_dialogsum_quarantine",
            ("split", "row_number", "id", "reason", "raw"),
            [(q.split, q.row_number, q.id, q.reason, q.raw) for q in loaded.quarantined],
        )
    kept, quarantined = loaded.kept_counts(), loaded.quarantined_counts()
    reasons = Counter(q.reason.split(":")[0] for q in loaded.quarantined)
    table = markdown_table(
        ["split", "rows in", "kept", "quarantined"],
        [(s, loaded.rows_in[s], kept[s], quarantined[s]) for s in loaded.rows_in],
    )
    context.log.info(f"{source}: {sum(loaded.rows_in.values())} rows in, {sum(kept.values())} kept, {sum(quarantined.values())} quarantined")
    return dg.MaterializeResult(
        metadata={
            "source": source,
            "content_hash": loaded.content_hash(),
            "dagster/row_count": len(loaded.dialogues),
            "rows_in": sum(loaded.rows_in.values()),
            "rows_kept": sum(kept.values()),
            "rows_quarantined": sum(quarantined.values()),
            "quarantine_reasons": dict(reasons),
            "counts": dg.MetadataValue.md(table),
        },
        data_version=dg.DataVersion(loaded.content_hash()[:16]),
    )


@dg.asset(
    deps=[raw_dialogsum],
    group_name="data",
    kinds={"python", "duckdb"},
    code_version="1",
    description="The notebook's subset: per split, rows whose index satisfies index % modulus == offset.",
)
def filtered_split(context: dg.AssetExecutionContext, config: FilterConfig, store: LorasumStore) -> dg.MaterializeResult:
    spec: FilterSpec = with_overrides(get_profile().filter, config.model_dump())
    with store.connect() as con:
        dialogues = read_dialogues(con, "raw_dialogsum")
        kept = filter_split(dialogues, spec)
        replace_table(con, "filtered_split", DIALOGUE_COLUMNS, _dialogue_rows(kept))
    counts = Counter(d.split for d in kept)
    ids = {split: [d.id for d in kept if d.split == split] for split in counts}
    content_hash = _hash_rows(_dialogue_rows(kept))
    context.log.info(f"filter {spec}: kept {dict(counts)} of {len(dialogues)} dialogues")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(kept),
            "filter": str(spec),
            "rows_per_split": dict(counts),
            "rows_in": len(dialogues),
            "ids": dg.MetadataValue.json({k: v[:200] for k, v in ids.items()}),
            "content_hash": content_hash,
        },
        data_version=dg.DataVersion(content_hash[:16]),
    )


@dg.asset(
    deps=[filtered_split],
    group_name="data",
    kinds={"python", "duckdb"},
    code_version="1",
    description="Token ids, attention masks and labels (-100 on the prompt) for train and validation; unpadded.",
)
def tokenized_dataset(
    context: dg.AssetExecutionContext, config: TokenizeConfig, store: LorasumStore, model: LoraModelResource
) -> dg.MaterializeResult:
    profile = get_profile()
    max_length = config.max_length or profile.max_length
    use_chat_template = config.use_chat_template if config.use_chat_template is not None else model.use_chat_template
    tokenizer = model.tokenizer()
    rows, rejected = [], []
    with store.connect() as con:
        for split in ("train", "validation"):
            for d in read_dialogues(con, "filtered_split", split):
                try:
                    example = encode_example(tokenizer, d.dialogue, d.references[0], max_length, use_chat_template)
                except SummaryTooLongError as exc:
                    rejected.append((split, d.id, f"summary_exceeds_max_length: {exc}"))
                    continue
                label_tokens = sum(1 for x in example.labels if x != IGNORE_INDEX)
                rows.append(
                    (split, d.id, example.input_ids, [1] * len(example.input_ids), example.labels,
                     len(example.input_ids), example.prompt_tokens, label_tokens, example.truncated)
                )
        replace_table(
            con,
            "tokenized_dataset",
            ("split", "id", "input_ids", "attention_mask", "labels", "n_tokens", "prompt_tokens", "label_tokens", "truncated"),
            rows,
        )
        replace_table(con, "tokenized_dataset_rejected", ("split", "id", "reason"), rejected)
    if not any(r[0] == "train" for r in rows):
        raise ValueError("tokenized_dataset has no train rows; check the filter and max_length")
    lengths = [r[5] for r in rows]
    content_hash = _hash_rows((r[0], r[1], r[2], r[4]) for r in rows)
    stats = {
        "mean": round(sum(lengths) / len(lengths), 1),
        "min": min(lengths),
        "max": max(lengths),
        "p95": sorted(lengths)[int(0.95 * (len(lengths) - 1))],
    }
    truncated = sum(1 for r in rows if r[8])
    context.log.info(f"tokenized {len(rows)} rows (max_length {max_length}): {truncated} truncated, {len(rejected)} rejected; lengths {stats}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(rows),
            "rows_per_split": dict(Counter(r[0] for r in rows)),
            "rows_truncated": truncated,
            "rows_rejected": len(rejected),
            "max_length": max_length,
            "use_chat_template": use_chat_template,
            "token_length_stats": stats,
            "label_tokens": sum(r[7] for r in rows),
            "token_length_histogram": histogram(lengths, "Tokens per example", "tokens"),
            "content_hash": content_hash,
        },
        data_version=dg.DataVersion(content_hash[:16]),
    )
