"""raw_dialogsum → filtered_split → tokenized_dataset."""

import hashlib
import json
from collections import Counter

import dagster as dg

from lorasum_assets.defs.assets.plots import histogram, markdown_table
from lorasum_assets.defs.resources import LoraModelResource, LorasumStore, ProfileResource
from lorasum_assets.ml.data.dialogues import Dialogue, filter_split, load_local, normalise
from lorasum_assets.ml.data.prompts import IGNORE_INDEX, SummaryTooLongError, encode_example, required_max_length
from lorasum_assets.ml.data.readers import read_hub, read_sample
from lorasum_assets.settings.config import config_class, resolve
from lorasum_assets.settings.specs import DataSpec, FilterSpec, SettingError, TokenizeSpec
from lorasum_assets.settings.versions import code_version
from lorasum_assets.store.queries import dialogue_rows, tokenized_rows
from lorasum_assets.store.references import TableRef
from lorasum_assets.store.writes import write_materialization

DIALOGUE_COLUMNS = ("split", "id", "dialogue", "references", "topic", "source_index")
TOKENIZED_COLUMNS = ("split", "id", "input_ids", "attention_mask", "labels", "n_tokens", "prompt_tokens", "label_tokens", "truncated")

RawDataConfig = config_class("RawDataConfig", DataSpec, "Where DialogSum comes from.")
FilterConfig = config_class("FilterConfig", FilterSpec, "Which dialogues of each split are kept: by default 1 in 100 (index % 100 == 0).")
TokenizeConfig = config_class("TokenizeConfig", TokenizeSpec, "How training examples are tokenized.")


def _dialogue_rows(dialogues: list[Dialogue]) -> list[tuple]:
    return [(d.split, d.id, d.dialogue, d.references, d.topic, d.source_index) for d in dialogues]


def read_dialogues(con, ref: TableRef, split: str | None = None) -> list[Dialogue]:
    """The dialogues one materialization (``ref``) of raw_dialogsum or filtered_split wrote."""
    return [Dialogue(s, i, d, list(r), t, int(x)) for s, i, d, r, t, x in dialogue_rows(con, ref.asset, ref.run_id, split)]


def dataset_of(ref: TableRef) -> str:
    """The data source a filtered_split materialization came from (``sample``, ``hub:…``, ``local:…``)."""
    return ref.details.get("source") or "unknown"


def require(ref: TableRef | None, asset: str) -> TableRef:
    if ref is None:
        raise ValueError(f"{asset} has not been materialized yet; materialize it (or the whole graph) first")
    return ref


def _hash_rows(rows) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, default=str, ensure_ascii=False).encode())
    return digest.hexdigest()


@dg.asset(
    group_name="data",
    kinds={"python", "duckdb"},
    code_version=code_version(__name__),
    description="Every DialogSum dialogue as it arrived, one row per dialogue with a list of references.",
)
def raw_dialogsum(
    context: dg.AssetExecutionContext, config: RawDataConfig, profile: ProfileResource, store: LorasumStore
) -> dg.Output[TableRef]:
    data = resolve(profile.get().data, config)
    if data.source == "sample":
        loaded = normalise(read_sample(), "sample")
    elif data.source == "local":
        if not data.path:
            raise ValueError("source 'local' needs a path")
        loaded = load_local(data.path)
    else:
        loaded = normalise(read_hub(data.hub_dataset, data.hub_revision), f"hub:{data.hub_dataset}@{data.hub_revision or 'main'}")
    content_hash = loaded.content_hash()
    version = content_hash[:16]
    with store.connect() as con:
        write_materialization(
            con,
            "raw_dialogsum",
            context.run.run_id,
            {
                "raw_dialogsum": (DIALOGUE_COLUMNS, _dialogue_rows(loaded.dialogues)),
                "raw_dialogsum_quarantine": (
                    ("split", "file", "row_number", "id", "reason", "raw"),
                    [(q.split, q.file, q.row_number, q.id, q.reason, q.raw) for q in loaded.quarantined],
                ),
            },
            content_hash,
            version,
        )
    kept, quarantined = loaded.kept_counts(), loaded.quarantined_counts()
    reasons = Counter(q.reason.split(":")[0] for q in loaded.quarantined)
    table = markdown_table(
        ["split", "in", "kept", "quarantined"],
        [(s, loaded.rows_in[s], kept[s], quarantined[s]) for s in loaded.rows_in],
    )
    context.log.info(f"{loaded.source}: {sum(loaded.rows_in.values())} rows in, {sum(kept.values())} kept, {sum(quarantined.values())} quarantined")
    ref = TableRef(
        asset="raw_dialogsum", run_id=context.run.run_id, rows=len(loaded.dialogues), content_hash=version, data_version=version,
        details={"source": loaded.source, "rows_quarantined": sum(quarantined.values()), "max_quarantine_share": data.max_quarantine_share},
    )
    return dg.Output(
        ref,
        metadata={
            "source": loaded.source,
            "content_hash_prefix": content_hash[:16],
            "dagster/row_count": len(loaded.dialogues),
            "rows_in": sum(loaded.rows_in.values()),
            "rows_kept": sum(kept.values()),
            "rows_quarantined": sum(quarantined.values()),
            "quarantine_reasons": dict(reasons),
            "max_quarantine_share": data.max_quarantine_share,
            "rows per split": dg.MetadataValue.md(table),
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset(
    group_name="data",
    kinds={"python", "duckdb"},
    code_version=code_version(__name__),
    description="The dialogues kept of each split: those whose index satisfies index % modulus == offset (1 in 100 by default), or a seeded sample.",
)
def filtered_split(
    context: dg.AssetExecutionContext,
    config: FilterConfig,
    profile: ProfileResource,
    store: LorasumStore,
    raw_dialogsum: TableRef | None,
) -> dg.Output[TableRef]:
    spec: FilterSpec = resolve(profile.get().filter, config)
    upstream = require(raw_dialogsum, "raw_dialogsum")
    with store.connect() as con:
        dialogues = read_dialogues(con, upstream)
    kept = filter_split(dialogues, spec)
    rows = _dialogue_rows(kept)
    content_hash = _hash_rows(rows)
    with store.connect() as con:
        write_materialization(con, "filtered_split", context.run.run_id, {"filtered_split": (DIALOGUE_COLUMNS, rows)}, content_hash, content_hash[:16])
    counts = Counter(d.split for d in kept)
    ids = {split: [d.id for d in kept if d.split == split] for split in counts}
    context.instance.add_run_tags(context.run.run_id, {"lorasum/dataset_hash": content_hash[:16]})
    per_split = ", ".join(f"{n} {split}" for split, n in counts.items())
    context.log.info(f"kept {spec.describe()}: {per_split}, {sum(counts.values())} of {len(dialogues)} dialogues")
    return dg.Output(
        TableRef(
            asset="filtered_split", run_id=context.run.run_id, rows=len(kept), content_hash=content_hash[:16], data_version=content_hash[:16],
            details={"rows_per_split": dict(counts), "source": upstream.details.get("source")},
        ),
        metadata={
            "dagster/row_count": len(kept),
            "filter": spec.describe(),
            "rows_per_split": dict(counts),
            "rows_in": len(dialogues),
            "ids": dg.MetadataValue.json({k: v[:200] for k, v in ids.items()}),
            "content_hash_prefix": content_hash[:16],
        },
        data_version=dg.DataVersion(content_hash[:16]),
    )


def read_examples(con, ref: TableRef, split: str) -> list[tuple[str, list[int], list[int]]]:
    """(id, input_ids, labels) of one split of one tokenized_dataset materialization."""
    return [(i, list(ids), list(labels)) for i, ids, labels in tokenized_rows(con, ref.run_id, split)]


def _encode_splits(tokenizer, by_split: dict, spec: TokenizeSpec, use_chat_template: bool, boundary: str) -> tuple[list, list]:
    """Token rows of the train and validation dialogues, and the ones rejected with a reason. A
    max_length too short for the prompt frame and the longest summary fails before any row."""
    rows, rejected = [], []
    summaries = {f"{d.split}/{d.id}": d.references[0] for dialogues in by_split.values() for d in dialogues}
    required, longest_id, longest, frame = required_max_length(tokenizer, summaries, use_chat_template, boundary)
    if spec.max_length < required:
        raise SettingError(
            f"TokenizeSpec.max_length = {spec.max_length}; must be >= {required} to fit the prompt frame ({frame} tokens), "
            f"the longest summary ({longest_id}: {longest} tokens with EOS) and a dialogue token"
        )
    for split, dialogues in by_split.items():
        for d in dialogues:
            try:
                example = encode_example(tokenizer, d.dialogue, d.references[0], spec.max_length, use_chat_template, boundary)
            except SummaryTooLongError as exc:
                rejected.append((split, d.id, f"summary_exceeds_max_length: {exc}"))
                continue
            label_tokens = sum(1 for x in example.labels if x != IGNORE_INDEX)
            rows.append(
                (split, d.id, example.input_ids, [1] * len(example.input_ids), example.labels,
                 len(example.input_ids), example.prompt_tokens, label_tokens, example.truncated)
            )
    return rows, rejected


@dg.asset(
    group_name="data",
    kinds={"python", "duckdb"},
    code_version=code_version(__name__),
    description="Token ids, attention masks and labels (-100 on the prompt) for train and validation; unpadded.",
)
def tokenized_dataset(
    context: dg.AssetExecutionContext,
    config: TokenizeConfig,
    profile: ProfileResource,
    store: LorasumStore,
    model: LoraModelResource,
    filtered_split: TableRef | None,
) -> dg.Output[TableRef]:
    spec: TokenizeSpec = resolve(profile.get().tokenize, config)
    upstream = require(filtered_split, "filtered_split")
    choice = model.choice()
    use_chat_template, boundary = choice.use_chat_template, choice.prompt_boundary
    tokenizer = model.tokenizer(context.log.info)
    with store.connect() as con:
        by_split = {split: read_dialogues(con, upstream, split) for split in ("train", "validation")}
    rows, rejected = _encode_splits(tokenizer, by_split, spec, use_chat_template, boundary)
    if not any(r[0] == "train" for r in rows):
        raise ValueError(
            f"tokenized_dataset would have no train rows ({len(rejected)} rejected with max_length {spec.max_length}); "
            "check the filter and max_length"
        )
    content_hash = _hash_rows((r[0], r[1], r[2], r[4]) for r in rows)
    with store.connect() as con:
        write_materialization(
            con,
            "tokenized_dataset",
            context.run.run_id,
            {"tokenized_dataset": (TOKENIZED_COLUMNS, rows), "tokenized_dataset_rejected": (("split", "id", "reason"), rejected)},
            content_hash,
            content_hash[:16],
        )
    lengths = [r[5] for r in rows]
    stats = {
        "mean": round(sum(lengths) / len(lengths), 1),
        "min": min(lengths),
        "max": max(lengths),
        "p95": sorted(lengths)[int(0.95 * (len(lengths) - 1))],
    }
    truncated = sum(1 for r in rows if r[8])
    context.log.info(f"tokenized {len(rows)} rows (max_length {spec.max_length}): {truncated} truncated, {len(rejected)} rejected; "
                     f"tokens per example: mean {stats['mean']}, min {stats['min']}, p95 {stats['p95']}, max {stats['max']}")
    return dg.Output(
        TableRef(asset="tokenized_dataset", run_id=context.run.run_id, rows=len(rows), content_hash=content_hash[:16],
                 data_version=content_hash[:16], details={"max_length": spec.max_length}),
        metadata={
            "dagster/row_count": len(rows),
            "rows_per_split": dict(Counter(r[0] for r in rows)),
            "rows_truncated": truncated,
            "rows_rejected": len(rejected),
            "max_length": spec.max_length,
            "use_chat_template": use_chat_template,
            "prompt_boundary": boundary,
            "token_length_stats": stats,
            "label_tokens": sum(r[7] for r in rows),
            "token_length_histogram": histogram(lengths, "Tokens per example", "tokens per example", "examples"),
            "content_hash_prefix": content_hash[:16],
        },
        data_version=dg.DataVersion(content_hash[:16]),
    )
