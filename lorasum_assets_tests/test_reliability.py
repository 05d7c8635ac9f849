"""Bad input through the real assets, DuckDB under concurrent writers and kill -9, secrets and
paths. docs/reliability.md lists every case with the test that shows it."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.checks import ALL_CHECKS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets.store import open_history
from lorasum_assets.store.lake import history_location
from lorasum_assets_tests.conftest import history_of

REPO = Path(__file__).resolve().parents[1]


def good(split, i):
    return {"id": f"{split}_{i}", "dialogue": f"#Person1#: Hello number {i}.\n#Person2#: Hi.", "summary": f"They greet {i}.", "topic": "t"}


def write_split(folder: Path, split: str, rows):
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    (folder / f"{split}.jsonl").write_bytes(b"\n".join(lines) + (b"\n" if lines else b""))


def materialize(folder: Path, selection: str, extra_config=None):
    config = {"ops": {"raw_dialogsum": {"config": {"source": "local", "path": str(folder)}}, **(extra_config or {})}}
    return dg.materialize(
        ALL_ASSETS, resources=build_resources(get_profile("tiny")), instance=dg.DagsterInstance.ephemeral(),
        run_config=config, selection=selection, raise_on_error=False,
    )


def error_text(result, node=None):
    """Every message in the failure's cause chain: of one step, or (node=None) of every failure in the run."""
    if node is not None:
        failures = [result.failure_data_for_node(node).error]
    else:
        failures = [e.event_specific_data.error for e in result.all_events
                    if e.is_failure and getattr(e.event_specific_data, "error", None) is not None]
    messages = []
    for failure in failures:
        while failure is not None:
            messages.append(failure.message)
            failure = failure.cause
    return "\n".join(messages)


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


# ------------------------------------------------------------------------------------------------
# DuckDB: concurrent writers, kill -9 mid-write

WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[4])
    from lorasum_assets.defs.resources.store import LorasumStore
    from lorasum_assets_tests.test_store import seed_run
    store = LorasumStore(history="sqlite:" + sys.argv[1])
    worker, runs = sys.argv[2], int(sys.argv[3])
    for i in range(runs):
        with store.connect() as con:
            seed_run(con, f"w{worker}-r{i}", "2026-01-01", f"ad{worker}", 0.5, 0.6,
                     {f"ex{k}": (0.5, 0.6) for k in range(12)})
    print("done", worker)
    """
)


@pytest.mark.slow
def test_four_processes_write_history_at_once_and_no_row_is_lost(tmp_path):
    db = tmp_path / "history" / "catalog.sqlite"
    workers, runs = 4, 15
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(w), str(runs), str(REPO)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(workers)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    con = open_history(location=history_location(f"sqlite:{db}"))
    found = con.execute("SELECT count(*) FROM eval_runs").fetchone()[0]
    metrics = con.execute("SELECT count(*) FROM eval_metrics").fetchone()[0]
    examples = con.execute("SELECT count(*) FROM eval_examples").fetchone()[0]
    print(f"\n{workers} processes x {runs} runs: written {workers * runs}, found {found} runs, {metrics} metric rows, {examples} example rows")
    assert found == workers * runs
    assert metrics == workers * runs * 3
    assert examples == workers * runs * 12 * 2


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import time
    sys.path.insert(0, sys.argv[2])
    from lorasum_assets.store.lake import history_location, open_history
    from lorasum_assets_tests.test_store import seed_run
    con = open_history(read_only=False, location=history_location("sqlite:" + sys.argv[1]))
    seed_run(con, "complete", "2026-01-01", "ad1", 0.5, 0.6, {"a": (0.5, 0.6)})

    class HeldBeforeCommit:  # the connection, except that COMMIT waits to be killed: every row written, none committed

        def __getattr__(self, name):
            return getattr(con, name)

        def execute(self, sql, *args):
            if sql == "COMMIT":
                print("every row written, not yet committed", flush=True)
                time.sleep(600)
            return con.execute(sql, *args)

    seed_run(HeldBeforeCommit(), "partial", "2026-01-02", "ad2", 0.5, 0.6, {f"ex{k}": (0.5, 0.6) for k in range(200000)})
    print("finished", flush=True)
    """
)


def test_kill_9_during_a_write_leaves_no_partial_run(tmp_path):
    db = tmp_path / "history" / "catalog.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(db), str(REPO)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "every row written, not yet committed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    con = open_history(read_only=False, location=history_location(f"sqlite:{db}"))
    runs = sorted(r[0] for r in con.execute("SELECT run_id FROM eval_runs").fetchall())
    partial_examples = con.execute("SELECT count(*) FROM eval_examples WHERE run_id = 'partial'").fetchone()[0]
    partial_metrics = con.execute("SELECT count(*) FROM eval_metrics WHERE run_id = 'partial'").fetchone()[0]
    print(f"\nafter kill -9: runs {runs}, rows of the killed run: {partial_metrics} metrics, {partial_examples} examples")
    assert runs == ["complete"]
    assert partial_examples == partial_metrics == 0
    assert con.execute("SELECT count(*) FROM eval_examples WHERE run_id = 'complete'").fetchone()[0] == 2


# ------------------------------------------------------------------------------------------------
# Security


def test_hf_token_never_reaches_logs_metadata_or_duckdb(fresh_home, monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    resources = build_resources(get_profile("tiny"))
    token = resources["model"].data["hf_token"]
    assert isinstance(token, dg.EnvVar) and token == "HF_TOKEN"  # the name, not the value
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=resources, instance=instance)
    assert result.success
    logs = "\n".join(str(entry) for entry in instance.all_logs(result.run_id))
    assert secret not in logs
    run_config = json.dumps(result.dagster_run.run_config, default=str)
    assert secret not in run_config
    con = history_of(fresh_home)
    tables = con.execute("SELECT table_name FROM information_schema.tables WHERE table_catalog = 'lorasum' AND table_type = 'BASE TABLE'").fetchall()
    assert len(tables) > 10
    for (table,) in tables:
        dump = json.dumps(con.execute(f'SELECT * FROM lorasum.main."{table}"').fetchall(), default=str)
        assert secret not in dump, table
    for path in (fresh_home / "history").rglob("*"):  # the catalog (inlined rows too) and every data file
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    for path in (fresh_home / "adapters").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md"):
            assert secret not in path.read_text(errors="ignore")


def test_remote_code_is_off_unless_a_profile_turns_it_on():
    from lorasum_assets.defs.resources import LoraModelResource, ProfileResource
    from lorasum_assets.ml.models.loading import ModelSpec
    from lorasum_assets.settings.profiles import PROFILES

    assert ModelSpec(model="x").trust_remote_code is False
    assert LoraModelResource(profile=ProfileResource(name="tiny"), model="x").choice().trust_remote_code is False
    assert all(p.model.trust_remote_code is False for p in PROFILES.values())


def test_weights_load_with_safetensors_and_torch_load_is_weights_only(tiny_model_dir, monkeypatch):
    import transformers

    from lorasum_assets.ml.models.loading import ModelSpec, load_model

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.update(kw) or original(path, **kw))
    load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    for source in (REPO / "lorasum_assets").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", source.read_text()):
            assert "weights_only=True" in call, f"{source}: {call}"


def test_paths_cannot_climb_out_of_the_home(fresh_home):
    from lorasum_assets.ml.models.loading import ModelSpec, resolve_model_path
    from lorasum_assets.runtime.home import UnsafePathError, home_subdir

    assert home_subdir("adapters") == fresh_home / "adapters"
    for bad in (("..", "elsewhere"), ("adapters", "..", "..", "x"), ("/etc",)):
        with pytest.raises(UnsafePathError):
            home_subdir(*bad)
    # a GGUF model name with traversal still lands in the model cache (only the file stem is used)
    with pytest.raises(FileNotFoundError):
        resolve_model_path(ModelSpec(model="gguf:no_such_package/../../../../tmp/evil.gguf", cache_dir=str(fresh_home / "models")))
    assert not (fresh_home.parent / "evil").exists()


def test_dependencies_have_upper_bounds_and_the_ui_binds_localhost():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
        assert "<" in requirement or "==" in requirement, f"{requirement} has no upper bound"
    ui_recipe = (REPO / "Makefile").read_text().split("\nui:")[1].split("\n\n")[0]
    assert "--host 127.0.0.1" in ui_recipe


# ------------------------------------------------------------------------------------------------
# Crashes in evaluation


@pytest.mark.slow  # runs a real job, kills it mid-step and runs it again: 30-40 s
def test_a_killed_generation_step_rematerializes_cleanly(fresh_home, tmp_path):
    # base_predictions reads the filtered_split materialization recorded in the same Dagster instance
    (tmp_path / "dagster").mkdir()
    with dg.DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        assert dg.materialize(ALL_ASSETS, resources=build_resources(get_profile("tiny")), instance=instance,
                              selection="*filtered_split").success
    slow = tmp_path / "slow.yaml"
    slow.write_text(json.dumps({"ops": {"base_predictions": {"config": {"max_new_tokens": 400, "batch_size": 1}}}}))
    env = {**os.environ, "LORASUM_HOME": str(fresh_home), "LORASUM_PROFILE": "tiny", "DAGSTER_HOME": str(tmp_path / "dagster")}
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "lorasum_assets.definitions", "--select", "base_predictions"]
    proc = subprocess.Popen([*command, "-c", str(slow)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if "base_predictions: 2/12 summaries" in line or time.monotonic() > deadline:
            break
    assert proc.poll() is None, "generation finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    con = history_of(fresh_home)
    assert con.execute("SELECT count(*) FROM base_predictions").fetchone()[0] == 0  # nothing half-written
    con.close()

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    con = history_of(fresh_home)
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM base_predictions").fetchone() == (12, 12)


def test_generation_that_runs_out_of_cuda_memory_halves_its_batch_down_to_one(tiny_model, tiny_tokenizer, monkeypatch):
    import torch

    from lorasum_assets.ml.generation.generate import generate
    from lorasum_assets.settings.specs import GenerationSpec

    real_generate, sizes = tiny_model.generate, []

    def fits_two_at_most(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_generate(**kwargs)

    # model.generate is the path a CUDA model takes; on this CPU decoder auto would take lorasum
    monkeypatch.setattr(tiny_model, "generate", fits_two_at_most)
    prompts = [[1, 5 + i, 6, 7] for i in range(7)]
    spec = GenerationSpec(max_new_tokens=4, batch_size=8, decoder="transformers")
    said: list[str] = []
    halved = generate(tiny_model, tiny_tokenizer, prompts, spec, on_progress=said.append)
    print(f"batch sizes tried {sizes}; said {said}")
    assert sizes == [7, 4, 2, 2, 2, 1]
    assert said == ["CUDA ran out of memory generating 7 summaries at once; going on 4 at a time",
                    "CUDA ran out of memory generating 4 summaries at once; going on 2 at a time"]
    monkeypatch.setattr(tiny_model, "generate", real_generate)
    assert [g.text for g in halved] == [g.text for g in generate(tiny_model, tiny_tokenizer, prompts, spec)]

    def never_fits(**kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tiny_model, "generate", never_fits)
    with pytest.raises(RuntimeError, match=r"a single prompt: lower the generation batch_size \(now 4\) or max_new_tokens \(now 9\)"):
        generate(tiny_model, tiny_tokenizer, [[1, 5, 6], [1, 7, 8]], GenerationSpec(max_new_tokens=9, batch_size=4, decoder="transformers"))
