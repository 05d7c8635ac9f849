"""The whole graph on the tiny model, into a temporary home."""

import hashlib
import json
import re

import dagster as dg
import pytest

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.checks import ALL_CHECKS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets_tests.helpers import history_of


def materialize_all(instance=None, run_config=None):
    return dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        resources=build_resources(get_profile("tiny")),
        instance=instance or dg.DagsterInstance.ephemeral(),
        run_config=run_config,
    )


@pytest.fixture()
def materialized(fresh_home):
    result = materialize_all()
    assert result.success
    return fresh_home, result


def test_whole_graph_materializes_on_the_tiny_model(materialized):
    home, result = materialized
    con = history_of(home)
    count = lambda table, where="": con.execute(f"SELECT count(*) FROM {table} {where}").fetchone()[0]  # noqa: E731
    assert count("raw_dialogsum") == 64
    assert count("filtered_split") == 64
    assert count("tokenized_dataset") == 52  # 44 train + 8 validation
    assert count("adapters") == 1
    assert count("base_predictions") == 12 and count("tuned_predictions") == 12
    assert count("eval_runs") == 1
    # 7 metrics x (base, tuned, delta), single-reference sample
    assert count("eval_metrics") == 21
    assert count("eval_examples") == 24

    path, sha = con.execute("SELECT path, sha256 FROM adapters").fetchone()
    from pathlib import Path

    files = {p.name for p in Path(path).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert json.loads((Path(path) / "adapter_config.json").read_text())["r"] == get_profile("tiny").training.lora_r
    assert sha == hashlib.sha256((Path(path) / "adapter_model.safetensors").read_bytes()).hexdigest()  # the weights' own hash

    losses = [r[0] for r in con.execute("SELECT loss FROM training_steps ORDER BY step").fetchall()]
    assert len(losses) == con.execute("SELECT count(*) FROM training_steps").fetchone()[0] > 2
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    test_ids = {r[0] for r in con.execute("SELECT id FROM filtered_split WHERE split = 'test'").fetchall()}
    assert {r[0] for r in con.execute("SELECT id FROM base_predictions").fetchall()} == test_ids
    assert {r[0] for r in con.execute("SELECT id FROM tuned_predictions").fetchall()} == test_ids

    report = con.execute("SELECT model, metric, value FROM bertscore_report WHERE reference_set = 'all'").fetchall()
    got = {(m, k) for m, k, _ in report}
    for model in ("base", "tuned"):
        for metric in ("bertscore_precision", "bertscore_recall", "bertscore_f1"):
            assert (model, metric) in got
    assert all(0.0 <= v <= 1.0 for m, _, v in report if m != "delta")

    curve = result.asset_materializations_for_node("lora_adapter")[0].metadata["loss_curve_points"].value
    rates = [r.data["lr"] for r in curve.records]
    assert rates and all(rate == float(f"{rate:.3g}") for rate in rates)  # 0.00497, not 0.004974553604702332

    report_meta = result.asset_materializations_for_node("bertscore_report")[0].metadata
    metric_names = ["BERTScore P", "BERTScore R", "BERTScore F1", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum"]
    tables = [k for k, v in report_meta.items() if isinstance(v, dg.TableMetadataValue)]
    assert tables == metric_names  # one table per metric, laid out in the UI; no figure repeated elsewhere
    assert not [k for k in report_meta if k.startswith(("base_", "tuned_"))]
    for name in metric_names:
        table = report_meta[name].value
        assert [c.name for c in table.schema.columns] == ["", "mean [95% CI]"] and all(c.description for c in table.schema.columns)
        assert [r.data[""] for r in table.records] == ["base", "tuned", "change", "% diff"]
    f1 = {r.data[""]: r.data["mean [95% CI]"] for r in report_meta["BERTScore F1"].value.records}
    mean, ci = f1["change"].split(" [")
    low, high = (float(x) for x in ci.split("]")[0].split(","))
    assert f1["change"].endswith("▲" if low > 0 else "▼" if high < 0 else "]")
    # the figures a person charts across runs, rounded as in the table
    assert report_meta["BERTScore F1 change"].value == float(mean)
    assert report_meta["BERTScore F1 base"].value == float(f1["base"].split(" [")[0])
    histogram = report_meta["F1 change per dialogue"].value
    assert histogram.startswith("![BERTScore F1 change per dialogue](data:image/png;base64,") and len(histogram) < 1000
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["quarantine_share_within_limit"] and checks["labels_end_with_eos"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = EventAccumulator(str(home / "tensorboard" / result.run_id))
    curves.Reload()
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "validation/loss"} <= set(curves.Tags()["scalars"])
    assert [e.step for e in curves.Scalars("train/loss")] == list(range(1, len(losses) + 1))


def test_long_steps_report_progress_in_the_run_log(fresh_home):
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_all(instance).success
    messages = [e.user_message for e in instance.all_logs(instance.get_runs()[0].run_id) if e.user_message]
    text = "\n".join(messages)
    assert "loading the base model of builtin:tiny-llama\n" in text + "\n"
    assert any(m.startswith("loaded the base model in ") and m.endswith(": float32 weights, not quantized, on cpu") for m in messages)
    assert "training 22 optimizer steps on 44 examples" in text
    # a log in plain words: no markdown escapes, losses to 4 decimals
    assert not re.search(r"\\[|\[\]()*_-]", text), re.search(r".{40}\\[|\[\]()*_-].{40}", text)
    assert all(re.fullmatch(r"epoch \d+: validation loss \d+\.\d{4}", m) for m in messages if m.startswith("epoch "))
    report = next(m for m in messages if m.startswith("base vs tuned on "))
    assert "BERTScore F1" in report and "|" not in report
    assert any(m.startswith("step 22/22 steps, ") and "s left" in m for m in messages)
    assert "base_predictions: generating 12 summaries" in text and "base_predictions: 12/12 summaries" in text
    assert "tuned_predictions: 12/12 summaries" in text
    assert "scoring 12 base and 12 tuned summaries with all-MiniLM-L6-v2" in text and "scored in" in text


def test_too_many_quarantined_rows_block_the_run(fresh_home, tmp_path):
    rows = [{"id": f"train_{i}", "dialogue": "#Person1#: Hi." if i < 5 else "", "summary": "s", "topic": "t"} for i in range(10)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        resources=build_resources(get_profile("tiny")),
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"raw_dialogsum": {"config": {"source": "local", "path": str(tmp_path / "data")}}}},
        raise_on_error=False,
    )
    assert not result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["quarantine_share_within_limit"].passed is False
    assert checks["quarantine_share_within_limit"].metadata["quarantined"].value == 5
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"raw_dialogsum"}  # the blocking check stopped everything downstream


def test_wrong_columns_fail_with_expected_and_found(fresh_home, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "a", "label": "b"}\n')
    result = dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS],
        resources=build_resources(get_profile("tiny")),
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"raw_dialogsum": {"config": {"source": "local", "path": str(tmp_path / "data")}}}},
        selection="raw_dialogsum",
        raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node("raw_dialogsum").error
    message = str(failure.cause.message if failure.cause else failure.message)
    assert "expected ['id', 'dialogue', 'summary', 'topic']" in message and "found ['label', 'text']" in message


def test_summarize_with_a_trained_adapter_and_a_corrupted_one(fresh_home, tmp_path, capsys):
    from lorasum_assets.tools.cli import main

    assert dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(get_profile("tiny")), instance=dg.DagsterInstance.ephemeral(),
        selection="*lora_adapter",
    ).success
    con = history_of(fresh_home)
    adapter_id, path = con.execute("SELECT adapter_id, path FROM adapters").fetchone()
    con.close()
    dialogue = tmp_path / "d.txt"
    dialogue.write_text("#Person1#: Could you lend me your umbrella?\n#Person2#: Of course, here it is.\n")
    assert main(["summarize", "--adapter", adapter_id, "--file", str(dialogue), "--json", "--max-new-tokens", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapter_id"] == adapter_id and 0 < out["new_tokens"] <= 8

    import os
    import subprocess
    import sys

    # as a user runs it: the summary on stdout, and nothing else on the terminal
    quiet = subprocess.run([sys.executable, "-m", "lorasum_assets.tools.cli", "summarize", "--adapter", adapter_id, "--file", str(dialogue),
                            "--max-new-tokens", "8"], env={**os.environ, "LORASUM_HOME": str(fresh_home)}, capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stdout.strip() and quiet.stderr == ""

    from pathlib import Path

    Path(path, "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    capsys.readouterr()
    assert main(["summarize", "--adapter", adapter_id, "--file", str(dialogue)]) == 1
    assert f"adapter {adapter_id} is damaged: {path}/adapter_model.safetensors has sha256" in capsys.readouterr().err


def test_two_materializations_leave_two_history_runs_each_with_the_engine_that_generated(fresh_home, capsys):
    import json as json_module

    from lorasum_assets.tools.cli import main

    def forced(decoder: str) -> dict:
        config = {"config": {"decoder": decoder, "precision": "as_loaded"}}
        return {"ops": {"base_predictions": config, "tuned_predictions": config}}

    instance = dg.DagsterInstance.ephemeral()
    first = materialize_all(instance, forced("transformers"))
    second = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(get_profile("tiny")), instance=instance,
                            run_config=forced("lorasum"), selection=["base_predictions", "tuned_predictions", "bertscore_report"])
    assert first.success and second.success

    def recorded(result) -> dict:
        return {e.asset_key.path[-1]: (e.materialization.metadata["engine"].value, e.materialization.metadata["engine_dtype"].value,
                                       e.materialization.tags["dagster/data_version"])
                for e in result.get_asset_materialization_events() if e.asset_key.path[-1].endswith("_predictions")}

    a, b = recorded(first), recorded(second)
    assert {k: v[:2] for k, v in a.items()} == {"base_predictions": ("transformers", "float32"), "tuned_predictions": ("transformers", "float32")}
    assert {k: v[:2] for k, v in b.items()} == {"base_predictions": ("lorasum", "float32"), "tuned_predictions": ("lorasum", "float32")}
    assert all(a[k][2] != b[k][2] for k in a)  # other engine, other data version
    con = history_of(fresh_home)
    assert con.execute("SELECT count(DISTINCT run_id) FROM eval_runs").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM eval_metrics").fetchone()[0] == 42
    assert con.execute("SELECT count(*) FROM adapters").fetchone()[0] == 1
    con.close()

    capsys.readouterr()
    assert main(["report", "--json", "--run", second.run_id]) == 0
    engines = json_module.loads(capsys.readouterr().out)["engines"]
    print(f"report --json engines: {json_module.dumps(engines)}")
    assert engines["base"]["engine"] == engines["tuned"]["engine"] == "lorasum" and engines["base"]["dtype"] == "float32"
    assert engines["base"]["device"].startswith("cpu: ") and engines["base"]["transformers"]
    assert main(["compare", first.run_id, second.run_id]) == 0
    said = capsys.readouterr().out
    print(f"first run {a}\nsecond run {b}\n{said}")
    assert "the runs generated with different engines, so part of any change may be the engine's: base: engine transformers -> lorasum" in said
    assert "tuned: engine transformers -> lorasum" in said
