"""Bad data in, a clear error out: quarantined rows with their reason, unreadable sources, over-long
dialogues and summaries, unknown names, unwritable folders. Counts in = kept + rejected."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.checks import ALL_CHECKS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets_tests.helpers import error_text, good, history_of

REPO = Path(__file__).resolve().parents[1]




def write_split(folder: Path, split: str, rows):
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    (folder / f"{split}.jsonl").write_bytes(b"\n".join(lines) + (b"\n" if lines else b""))


def materialize(folder: Path, selection: str, extra_config=None):
    config = {"ops": {"raw_dialogsum": {"config": {"source": "local", "path": str(folder)}}, **(extra_config or {})}}
    return dg.materialize(
        ALL_ASSETS, resources=build_resources(get_profile("tiny")), instance=dg.DagsterInstance.ephemeral(),
        run_config=config, selection=selection, raise_on_error=False,
    )




LONG_DIALOGUE = "\n".join(f"#Person{1 + i % 2}#: " + " ".join(f"word{j}x{i}" for j in range(40)) for i in range(700))

# case, rows for train (validation and test get two good rows each), expected quarantine reason
QUARANTINE_CASES = [
    ("null dialogue", [good("train", 0), {**good("train", 1), "dialogue": None}], "empty_dialogue"),
    ("empty dialogue", [good("train", 0), {**good("train", 1), "dialogue": ""}], "empty_dialogue"),
    ("whitespace-only dialogue", [good("train", 0), {**good("train", 1), "dialogue": "  \n "}], "whitespace_dialogue"),
    ("non-string summary", [good("train", 0), {**good("train", 1), "summary": 3.5}], "non_string_field: summary"),
    ("null summary in train", [good("train", 0), {**good("train", 1), "summary": None}], "missing_summary"),
    ("duplicate ids", [good("train", 0), good("train", 1), {**good("train", 1), "dialogue": "#Person1#: x"}], "duplicate_id"),
    ("invalid UTF-8", [good("train", 0), b'{"id": "train_1", "dialogue": "caf\xe9", "summary": "s"}'], "invalid_utf8"),
    ("broken JSON line", [good("train", 0), b'{"id": "train_1", "dialogue": "#Person1#: hi'], "invalid_json"),
]


@pytest.mark.parametrize("case,rows,reason", QUARANTINE_CASES, ids=[c[0] for c in QUARANTINE_CASES])
def test_bad_rows_are_quarantined_by_the_asset(fresh_home, tmp_path, case, rows, reason):
    write_split(tmp_path, "train", rows)
    for split in ("validation", "test"):
        write_split(tmp_path, split, [good(split, 0), good(split, 1)])
    result = materialize(tmp_path, "raw_dialogsum")
    assert result.success
    meta = result.asset_materializations_for_node("raw_dialogsum")[0].metadata
    assert meta["rows_in"].value == meta["rows_kept"].value + meta["rows_quarantined"].value == len(rows) + 4
    con = history_of(fresh_home)
    reasons = [r[0] for r in con.execute("SELECT reason FROM raw_dialogsum_quarantine").fetchall()]
    assert any(r.startswith(reason) for r in reasons), reasons


def test_mixed_good_and_bad_rows_lose_nothing(fresh_home, tmp_path):
    rows = [good("train", i) for i in range(20)] + [{**good("train", 20), "dialogue": ""}, b"\xff\xfe", {**good("train", 3)}]
    write_split(tmp_path, "train", rows)
    write_split(tmp_path, "test", [good("test", 0)])
    result = materialize(tmp_path, "raw_dialogsum")
    meta = result.asset_materializations_for_node("raw_dialogsum")[0].metadata
    assert (meta["rows_in"].value, meta["rows_kept"].value, meta["rows_quarantined"].value) == (24, 21, 3)


@pytest.mark.parametrize(
    "case,files,message",
    [
        ("empty file", {"train": []}, "the file is empty"),
        ("wrong columns", {"train": [{"text": "a", "label": "b"}]}, "expected ['id', 'dialogue', 'summary', 'topic']"),
        ("no data files", {}, "no data files in the folder"),
    ],
    ids=["empty file", "wrong columns", "no data files"],
)
def test_unreadable_sources_fail_with_a_clear_error(fresh_home, tmp_path, case, files, message):
    for split, rows in files.items():
        write_split(tmp_path, split, rows)
    (tmp_path / "notes.txt").write_text("not data")
    result = materialize(tmp_path, "raw_dialogsum")
    assert not result.success
    assert message in error_text(result, "raw_dialogsum")


def test_a_50000_token_dialogue_is_truncated_and_keeps_its_summary(fresh_home, tmp_path, tiny_tokenizer):
    n_tokens = len(tiny_tokenizer(LONG_DIALOGUE)["input_ids"])
    assert n_tokens >= 50_000
    write_split(tmp_path, "train", [good("train", 0), {**good("train", 1), "dialogue": LONG_DIALOGUE}])
    write_split(tmp_path, "test", [good("test", 0)])
    result = materialize(tmp_path, "*tokenized_dataset")
    assert result.success
    meta = result.asset_materializations_for_node("tokenized_dataset")[0].metadata
    assert meta["rows_truncated"].value == 1
    con = history_of(fresh_home)
    n, labels = con.execute("SELECT n_tokens, labels FROM tokenized_dataset WHERE id = 'train_1'").fetchone()
    assert n <= meta["max_length"].value
    assert tiny_tokenizer.decode([t for t in labels if t != -100]) == " They greet 1." + tiny_tokenizer.eos_token  # the natural boundary


def test_a_summary_longer_than_max_length_fails_naming_the_row_and_the_length_needed(fresh_home, tmp_path):
    long_summary = "They talk. " * 200
    write_split(tmp_path, "train", [good("train", 0), {**good("train", 1), "summary": long_summary}])
    write_split(tmp_path, "test", [good("test", 0)])
    result = materialize(tmp_path, "*tokenized_dataset", {"tokenized_dataset": {"config": {"max_length": 128}}})
    assert not result.success
    message = error_text(result, "tokenized_dataset")
    assert "TokenizeSpec.max_length = 128; must be >= " in message and "the longest summary (train/train_1:" in message
    con = history_of(fresh_home)
    assert con.execute("SELECT count(*) FROM tokenized_dataset").fetchone()[0] == 0  # nothing was written


def test_an_unknown_data_source_and_an_unknown_adapter_are_named(fresh_home, tmp_path):
    result = dg.materialize(ALL_ASSETS, resources=build_resources(get_profile("tiny")), instance=dg.DagsterInstance.ephemeral(),
                            run_config={"ops": {"raw_dialogsum": {"config": {"source": "ftp"}}}}, selection="raw_dialogsum", raise_on_error=False)
    assert "DataSpec.source = 'ftp'; allowed: sample, hub, local" in error_text(result, "raw_dialogsum")
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize(ALL_ASSETS, resources=build_resources(get_profile("tiny")), instance=instance,
                          selection="*filtered_split").success
    result = dg.materialize(ALL_ASSETS, resources=build_resources(get_profile("tiny")), instance=instance,
                            run_config={"ops": {"tuned_predictions": {"config": {"adapter_id": "no-such-adapter"}}}},
                            selection="tuned_predictions", raise_on_error=False)
    # refused when the run starts, before any step (and so before any generation)
    assert "no adapter with id 'no-such-adapter'" in error_text(result)
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_START]


def test_an_unknown_profile_fails_at_load_and_lists_the_valid_ones(tmp_path):
    env = {**os.environ, "LORASUM_PROFILE": "gpt-17", "LORASUM_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "import lorasum_assets.definitions"], env=env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert "unknown profile 'gpt-17'; valid profiles: llama-3.2-3b-qlora, smollm2-135m, tiny" in proc.stderr


def test_an_unwritable_adapter_folder_fails_clearly_and_registers_nothing(fresh_home):
    (fresh_home / "adapters").write_text("a file where the adapters folder should be")
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(get_profile("tiny")),
                            instance=dg.DagsterInstance.ephemeral(), selection="*lora_adapter", raise_on_error=False)
    assert not result.success
    assert "cannot write the adapter to" in error_text(result, "lora_adapter")
    con = history_of(fresh_home)
    assert con.execute("SELECT count(*) FROM adapters").fetchone()[0] == 0
