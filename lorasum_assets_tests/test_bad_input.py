"""Every bad setting and bad input file gets a clear answer, and no earlier table loses rows.

One tiny home is materialized once for the module; each case then runs against it and checks the
outcome, the message, and that every asset's current rows are still all there.
"""

import json
from pathlib import Path

import dagster as dg
import pytest

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.checks import ALL_CHECKS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets_tests.helpers import error_text, good, history_of

VIEWS = ("raw_dialogsum", "raw_dialogsum_quarantine", "filtered_split", "tokenized_dataset", "base_predictions",
         "tuned_predictions", "eval_runs", "adapters", "training_steps")


@pytest.fixture(scope="module")
def home(tmp_path_factory, session_home):
    home = tmp_path_factory.mktemp("bad_input_home")
    (session_home / "models").mkdir(exist_ok=True)
    (home / "models").symlink_to(session_home / "models", target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORASUM_HOME", str(home))
        instance = dg.DagsterInstance.ephemeral()
        assert run(instance, "*").success
        yield home, instance


def run(instance, selection, ops=None, resources=None):
    if isinstance(selection, list | tuple):
        selection = dg.AssetSelection.assets(*selection)
    return dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(get_profile("tiny")), instance=instance, selection=selection,
        run_config={"ops": ops or {}, "resources": resources or {}}, raise_on_error=False,
    )


def counts(home: Path) -> dict[str, int]:
    con = history_of(home)
    try:
        return {view: con.execute(f"SELECT count(*) FROM {view}").fetchone()[0] for view in VIEWS}
    finally:
        con.close()


def config(asset, **fields):
    return {asset: {"config": fields}}


# (case, asset selection, ops config, resource config, message expected in the failure)
SETTINGS = [
    ("epochs 0", "lora_adapter", config("lora_adapter", epochs=0), None, "TrainSpec.epochs = 0; must be >= 1"),
    ("epochs -1", "lora_adapter", config("lora_adapter", epochs=-1), None, "TrainSpec.epochs = -1; must be >= 1"),
    ("learning rate 0", "lora_adapter", config("lora_adapter", learning_rate=0.0), None, "TrainSpec.learning_rate = 0.0; must be > 0.0"),
    ("negative learning rate", "lora_adapter", config("lora_adapter", learning_rate=-1e-4), None, "TrainSpec.learning_rate = -0.0001; must be > 0.0"),
    ("batch size 0", "lora_adapter", config("lora_adapter", batch_size=0), None, "TrainSpec.batch_size = 0; must be >= 1"),
    ("accumulation 0", "lora_adapter", config("lora_adapter", gradient_accumulation_steps=0), None, "TrainSpec.gradient_accumulation_steps = 0; must be >= 1"),
    ("max_steps 0", "lora_adapter", config("lora_adapter", max_steps=0), None, "TrainSpec.max_steps = 0; must be >= 1"),
    ("LoRA r 0", "lora_adapter", config("lora_adapter", lora_r=0), None, "TrainSpec.lora_r = 0; must be >= 1"),
    ("all-linear beside module names", "lora_adapter", config("lora_adapter", target_modules=["all-linear", "q_proj"]), None,
     "all-linear already takes every linear layer: give it alone"),
    ("no LoRA targets", "lora_adapter", config("lora_adapter", target_modules=[]), None, "name one module or more"),
    ("LoRA alpha 0", "lora_adapter", config("lora_adapter", lora_alpha=0), None, "TrainSpec.lora_alpha = 0; must be >= 1"),
    ("LoRA dropout 1.5", "lora_adapter", config("lora_adapter", lora_dropout=1.5), None, "TrainSpec.lora_dropout = 1.5; must be <= 0.9"),
    ("warmup ratio 2", "lora_adapter", config("lora_adapter", warmup_ratio=2.0), None, "TrainSpec.warmup_ratio = 2.0; must be <= 1.0"),
    ("unknown scheduler", "lora_adapter", config("lora_adapter", lr_scheduler="sometimes"), None, "TrainSpec.lr_scheduler = 'sometimes'; allowed: cosine"),
    ("unknown precision", "lora_adapter", config("lora_adapter", mixed_precision="fp8"), None, "TrainSpec.mixed_precision = 'fp8'; allowed: auto, bf16, fp16, no"),
    ("unknown attention", "lora_adapter", config("lora_adapter", attention="flash"), None, "TrainSpec.attention = 'flash'; allowed: auto, sdpa, eager"),
    ("unknown bias", "lora_adapter", config("lora_adapter", bias="some"), None, "TrainSpec.bias = 'some'; allowed: none, all, lora_only"),
    ("grad norm 0", "lora_adapter", config("lora_adapter", max_grad_norm=0.0), None, "TrainSpec.max_grad_norm = 0.0; must be > 0.0"),
    ("checkpoint every 0 steps", "lora_adapter", config("lora_adapter", checkpoint_steps=0), None, "TrainSpec.checkpoint_steps = 0; must be >= 1"),
    ("log every 0 steps", "lora_adapter", config("lora_adapter", logging_steps=0), None, "TrainSpec.logging_steps = 0; must be >= 1"),
    ("unknown launcher", "lora_adapter", config("lora_adapter", launcher="slurm"), None, "LauncherSpec.launcher = 'slurm'; allowed: in_process, accelerate"),
    ("2 processes in process", "lora_adapter", config("lora_adapter", num_processes=2), None, "num_processes > 1 needs launcher='accelerate'"),
    ("max_new_tokens 0", "base_predictions", config("base_predictions", max_new_tokens=0), None, "GenerationSpec.max_new_tokens = 0; must be >= 1"),
    ("generation batch 0", "base_predictions", config("base_predictions", batch_size=0), None, "GenerationSpec.batch_size = 0; must be >= 1"),
    ("unknown split", "base_predictions", config("base_predictions", split="dev"), None, "GenerationSpec.split = 'dev'; allowed: train, validation, test"),
    ("prompt budget 4", "base_predictions", config("base_predictions", max_prompt_tokens=4), None, "GenerationSpec.max_prompt_tokens = 4; must be >= 16"),
    ("temperature 0", "base_predictions", config("base_predictions", temperature=0.0), None, "GenerationSpec.temperature = 0.0; must be > 0.0"),
    ("top_p 1.5", "base_predictions", config("base_predictions", top_p=1.5), None, "GenerationSpec.top_p = 1.5; must be <= 1.0"),
    ("unknown LoRA dropout mask", "lora_adapter", config("lora_adapter", lora_dropout_mask="fast"), None,
     "TrainSpec.lora_dropout_mask = 'fast'; allowed: auto, packed_bits, torch"),
    ("unknown generation precision", "base_predictions", config("base_predictions", precision="fp8"), None,
     "GenerationSpec.precision = 'fp8'; allowed: auto, bf16, as_loaded"),
    ("no room for a prompt", "base_predictions", config("base_predictions", max_new_tokens=2040), None, "leaves no room for a prompt"),
    ("resamples 0", "bertscore_report", config("bertscore_report", bootstrap_resamples=0), None, "ReportSpec.bootstrap_resamples = 0; must be >= 100"),
    ("resamples 50", "bertscore_report", config("bertscore_report", bootstrap_resamples=50), None, "ReportSpec.bootstrap_resamples = 50; must be >= 100"),
    ("modulus 0", "filtered_split", config("filtered_split", modulus=0), None, "FilterSpec.modulus = 0; must be >= 1"),
    ("negative offset", "filtered_split", config("filtered_split", offset=-1), None, "FilterSpec.offset = -1; must be >= 0"),
    ("unknown source", "raw_dialogsum", config("raw_dialogsum", source="ftp"), None, "DataSpec.source = 'ftp'; allowed: sample, hub, local"),
    ("quarantine share 1.5", "raw_dialogsum", config("raw_dialogsum", max_quarantine_share=1.5), None, "DataSpec.max_quarantine_share = 1.5; must be <= 1.0"),
    ("local source without a path", "raw_dialogsum", config("raw_dialogsum", source="local"), None, "source 'local' needs a path"),
    ("max_length 10", "tokenized_dataset", config("tokenized_dataset", max_length=10), None, "TokenizeSpec.max_length = 10; must be >= 16"),
    ("max_length below the longest summary", "tokenized_dataset", config("tokenized_dataset", max_length=40), None,
     "TokenizeSpec.max_length = 40; must be >= "),
    ("unknown adapter id", ["tuned_predictions"], config("tuned_predictions", adapter_id="no-such-adapter"), None,
     "no adapter with id 'no-such-adapter' in the registry"),
    ("unknown profile", "raw_dialogsum", None, {"profile": {"config": {"name": "gpt-17"}}}, "unknown profile 'gpt-17'; valid profiles:"),
    ("unknown quantization", "tokenized_dataset", None, {"model": {"config": {"quantization": "int3"}}}, "ModelChoice.quantization = 'int3'; allowed: none, nf4"),
    ("unknown compute dtype", "tokenized_dataset", None, {"model": {"config": {"compute_dtype": "float8"}}}, "ModelChoice.compute_dtype = 'float8'; allowed:"),
    ("scorer layer 0", "bertscore_report", None, {"scorer": {"config": {"num_layers": 0}}}, "BertScoreSpec.num_layers = 0; must be >= 1"),
]


@pytest.mark.parametrize("case,selection,ops,resources,message", SETTINGS, ids=[c[0] for c in SETTINGS])
def test_a_bad_setting_fails_naming_field_value_and_range_and_loses_nothing(home, case, selection, ops, resources, message):
    folder, instance = home
    before = counts(folder)
    result = run(instance, selection, ops, resources)
    assert not result.success, case
    assert message in error_text(result), error_text(result)[-2000:]
    assert counts(folder) == before


def write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


def lines(*rows) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n"


def local(folder: Path, **extra):
    return config("raw_dialogsum", source="local", path=str(folder), **extra)


def quarantined(folder: Path, run_id: str) -> list[tuple]:
    con = history_of(folder)
    try:
        return con.execute(
            "SELECT file, row_number, reason FROM raw_dialogsum_quarantine_by_run WHERE run_id = ? ORDER BY row_number", [run_id]
        ).fetchall()
    finally:
        con.close()


def kept(folder: Path, run_id: str) -> int:
    con = history_of(folder)
    try:
        return con.execute("SELECT count(*) FROM raw_dialogsum_by_run WHERE run_id = ?", [run_id]).fetchone()[0]
    finally:
        con.close()


TRAIN = [good("train", i) for i in range(6)]


def test_a_utf8_bom_is_read_as_text_and_the_first_row_is_kept(home, tmp_path):
    folder, instance = home
    data = write(tmp_path / "d", "train.jsonl", b"\xef\xbb\xbf" + lines(*TRAIN))
    result = run(instance, "raw_dialogsum", local(data))
    assert result.success
    assert kept(folder, result.run_id) == 6 and quarantined(folder, result.run_id) == []


def test_an_upper_case_suffix_is_read(home, tmp_path):
    folder, instance = home
    result = run(instance, "raw_dialogsum", local(write(tmp_path / "d", "train.JSONL", lines(*TRAIN))))
    assert result.success and kept(folder, result.run_id) == 6


@pytest.mark.parametrize(
    "case,bad_line,reason",
    [
        ("lone surrogate", b'{"id": "x", "dialogue": "#Person1#: \\ud800 hi", "summary": "s", "topic": "t"}',
         "invalid_unicode: dialogue: lone surrogate at character 11"),
        ("100,000-deep nesting", b'{"id": "x", "dialogue": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         "too_deeply_nested: the JSON value nests deeper than the parser allows"),
        ("a 9 MB row", json.dumps({"id": "x", "dialogue": "a" * 9_000_000, "summary": "s", "topic": "t"}).encode(),
         "oversize_row: 9,000,058 bytes (limit 8,388,608)"),
    ],
    ids=["lone surrogate", "deep nesting", "oversize row"],
)
def test_a_pathological_row_is_quarantined_with_its_file_line_and_reason(home, tmp_path, case, bad_line, reason):
    folder, instance = home
    data = write(tmp_path / "d", "train.jsonl", lines(*TRAIN[:3], bad_line, *TRAIN[3:]))
    result = run(instance, "raw_dialogsum", local(data, max_quarantine_share=0.5))
    assert result.success, error_text(result)
    assert quarantined(folder, result.run_id) == [("train.jsonl", 4, reason)]
    assert kept(folder, result.run_id) == 6  # 7 rows in = 6 kept + 1 quarantined


def test_a_binary_file_stops_the_run_naming_the_file_and_replaces_nothing(home, tmp_path):
    folder, instance = home
    before = counts(folder)
    data = write(tmp_path / "d", "train.jsonl", bytes(range(256)) * 64)
    result = run(instance, "raw_dialogsum", local(data))
    assert not result.success
    assert f"{data / 'train.jsonl'}: none of its 65 rows could be read (row 1: invalid_json" in error_text(result)
    assert "is it really a .jsonl file?" in error_text(result)
    assert counts(folder) == before


def test_the_quarantine_limit_is_a_run_setting_and_the_check_says_why_and_how(home, tmp_path):
    folder, instance = home
    data = write(tmp_path / "d", "train.jsonl", lines(*TRAIN, b"{broken"))
    blocked = run(instance, ["raw_dialogsum", "filtered_split"], local(data))
    assert not blocked.success
    check = next(e for e in blocked.get_asset_check_evaluations() if e.check_name == "quarantine_share_within_limit")
    assert not check.passed
    assert check.description.startswith("1 of 7 rows quarantined (14.3% > 5.0%): 1 invalid_json.")
    assert "set ops.raw_dialogsum.config.max_quarantine_share" in check.description
    assert not blocked.asset_materializations_for_node("filtered_split")  # blocked downstream

    allowed = run(instance, ["raw_dialogsum", "filtered_split"], local(data, max_quarantine_share=0.2))
    assert allowed.success
    assert allowed.asset_materializations_for_node("filtered_split")[0].metadata["dagster/row_count"].value == 6


def test_a_240000_token_dialogue_is_bounded_at_generation_by_default(home, tmp_path):
    folder, instance = home
    huge = "\n".join(f"#Person{1 + i % 2}#: " + " ".join(f"w{j}" for j in range(400)) for i in range(600))
    test_rows = [good("test", 0), {**good("test", 1), "dialogue": huge}]
    data = write(tmp_path / "d", "train.jsonl", lines(*TRAIN))
    write(data, "test.jsonl", lines(*test_rows))
    result = run(instance, ["raw_dialogsum", "filtered_split", "base_predictions"],
                 {**local(data), **config("base_predictions", max_new_tokens=8)})
    assert result.success, error_text(result)
    meta = result.asset_materializations_for_node("base_predictions")[0].metadata
    assert meta["max_prompt_tokens"].value == 2048 - 8  # the tiny model's context minus max_new_tokens
    assert meta["prompts_truncated"].value == 1
