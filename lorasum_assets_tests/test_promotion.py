"""The champion/challenger gate, the alias registry, and shipping the production adapter (tiny model)."""

import json
import os
import subprocess
import sys
import textwrap

import dagster as dg
import pytest

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.checks import ALL_CHECKS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets.tools.cli import main
from lorasum_assets_tests.helpers import history_of

RETRAIN = ["lora_adapter", "tuned_predictions", "bertscore_report", "promoted_adapter"]
# On the tiny model: the profile's own settings beat the base; lr 0.5 makes an adapter worse than
# the first one; lr 0.005 for 6 epochs makes a better one.
RUNS = [("good", None), ("worse", {"learning_rate": 0.5}), ("better", {"learning_rate": 0.005, "epochs": 6})]


def _run(instance, selection=None, training=None, tuned=None):
    ops = {}
    if training:
        ops["lora_adapter"] = {"config": training}
    if tuned:
        ops["tuned_predictions"] = {"config": tuned}
    result = dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(get_profile("tiny")), instance=instance,
        selection=selection, run_config={"ops": ops} if ops else None,
    )
    assert result.success
    return result


def _production(home):
    con = history_of(home)
    try:
        return con.execute("SELECT adapter_id FROM production_adapters WHERE alias = 'production'").fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, session_home):
    """A good adapter, a worse one and a better one, trained and judged one after another."""
    home = tmp_path_factory.mktemp("promotion-home")
    (session_home / "models").mkdir(exist_ok=True)
    (home / "models").symlink_to(session_home / "models", target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORASUM_HOME", str(home))
        instance = dg.DagsterInstance.ephemeral()
        decisions = []
        for name, training in RUNS:
            result = _run(instance, None if name == "good" else RETRAIN, training)
            metadata = result.asset_materializations_for_node("promoted_adapter")[0].metadata
            run = instance.get_run_by_id(result.run_id)
            decisions.append(dict(name=name, run_id=result.run_id, reason=metadata["reason"].value,
                                  challenger=metadata["challenger"].value, production=_production(home),
                                  tag=run.tags.get("lorasum/promoted")))
        yield home, instance, decisions


def test_three_runs_promote_the_good_keep_the_worse_and_promote_the_better(three_runs):
    home, _, decisions = three_runs
    good, worse, better = decisions
    for d in decisions:
        print(f"{d['name']:>6}: {d['reason']}  -> production {d['production']}  lorasum/promoted={d['tag']}")
    assert good["reason"].startswith(f"promoted {good['challenger']}: bertscore_f1 +") and "over the base model" in good["reason"]
    assert good["production"] == [(good["challenger"],)] and good["tag"] == "true"
    assert worse["reason"].startswith(f"kept {good['challenger']}: {worse['challenger']} bertscore_f1 ")
    assert worse["production"] == [(good["challenger"],)] and worse["tag"] == "false"
    assert better["reason"].startswith(f"promoted {better['challenger']}: bertscore_f1 +") and f"over {good['challenger']}" in better["reason"]
    assert better["production"] == [(better["challenger"],)] and better["tag"] == "true"

    con = history_of(home)
    rows = con.execute(
        """SELECT decision, adapter_id, previous_adapter_id, compared_with, run_id, metric, delta, ci_low, ci_high, moved
           FROM promotions ORDER BY promotion_id"""
    ).fetchall()
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        ("promoted", good["challenger"], None, "base", good["run_id"]),
        ("kept", worse["challenger"], good["challenger"], good["challenger"], worse["run_id"]),
        ("promoted", better["challenger"], good["challenger"], good["challenger"], better["run_id"]),
    ]
    assert all(r[5] == "bertscore_f1" and r[7] <= r[6] <= r[8] for r in rows)
    assert rows[0][7] > 0 and rows[1][7] <= 0 and rows[2][7] > 0  # the CI's low end decides
    # the champion's side of each pairing is its own evaluation from the history
    from lorasum_assets.ml.evaluation.stats import paired_bootstrap_ci

    def f1(run_id, model="tuned"):
        return dict(con.execute("SELECT id, bertscore_f1 FROM eval_examples WHERE run_id = ? AND model = ?", [run_id, model]).fetchall())

    ids = sorted(f1(better["run_id"]))
    change = paired_bootstrap_ci([f1(better["run_id"])[i] for i in ids], [f1(good["run_id"])[i] for i in ids])
    assert rows[2][6:9] == pytest.approx((change.mean, change.low, change.high))


def test_an_unscored_champion_is_scored_first_on_the_runs_examples(three_runs, monkeypatch):
    home, instance, decisions = three_runs
    monkeypatch.setenv("LORASUM_HOME", str(home))
    champion = decisions[-1]["challenger"]
    # other generation settings: no earlier evaluation of the champion pairs with this one
    result = _run(instance, RETRAIN, {"learning_rate": 0.5}, tuned={"max_new_tokens": 12})
    messages = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message]
    assert any(m.startswith(f"champion {champion} was never scored on these 12 examples") for m in messages)
    assert "champion: 12/12 summaries" in "\n".join(messages)
    con = history_of(home)
    scored = con.execute(
        "SELECT count(*), max(new_tokens) FROM champion_examples WHERE run_id = ? AND adapter_id = ?",
        [result.run_id, champion],
    ).fetchone()
    assert scored[0] == 12 and scored[1] <= 12
    decision = con.execute("SELECT decision, compared_with FROM promotions WHERE run_id = ?", [result.run_id]).fetchone()
    assert decision == ("kept", champion)
    assert _production(home) == [(champion,)]


def test_rollback_restores_the_previous_champion_and_summarize_uses_it(three_runs, monkeypatch, capsys, tmp_path):
    home, _, decisions = three_runs
    monkeypatch.setenv("LORASUM_HOME", str(home))
    good, better = decisions[0]["challenger"], decisions[-1]["challenger"]
    assert main(["rollback", "--reason", "the better adapter misbehaves in the field"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert f"{better} -> {good}" in out
    assert _production(home) == [(good,)]
    dialogue = tmp_path / "d.txt"
    dialogue.write_text("#Person1#: Could you lend me your umbrella?\n#Person2#: Of course, here it is.\n")
    assert main(["summarize", "--file", str(dialogue), "--max-new-tokens", "8"]) == 0
    err = capsys.readouterr().err
    print(err)
    assert f"using adapter {good} (production on builtin:tiny-llama / sample)" in err
    con = history_of(home)
    last = con.execute("SELECT decision, adapter_id, previous_adapter_id, reason FROM promotions ORDER BY promotion_id DESC LIMIT 1").fetchone()
    assert last == ("rollback", good, better, "the better adapter misbehaves in the field")
    con.close()
    assert main(["promote", better, "--reason", "fixed"]) == 0
    assert _production(home) == [(better,)]
    assert main(["promote", better]) == 1
    assert "already holds production" in capsys.readouterr().err


def test_summarize_a_jsonl_file_keeps_every_good_line_and_names_the_bad_ones(three_runs, tmp_path):
    home, _, _ = three_runs
    lines = [json.dumps({"id": f"d{n}", "dialogue": f"#Person1#: Hello number {n}.\n#Person2#: Hi, see you at {n}."}) for n in range(1, 51)]
    lines[6] = '{"id": "d7", "dialogue": '  # line 7: cut off
    lines[30] = json.dumps({"id": "d31", "text": "no dialogue field"})  # line 31
    source, target = tmp_path / "dialogues.jsonl", tmp_path / "summaries.jsonl"
    source.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "lorasum_assets.tools.cli", "summarize", "--input", str(source), "--output", str(target), "--max-new-tokens", "6"],
        env={**os.environ, "LORASUM_HOME": str(home)}, capture_output=True, text=True, timeout=600,
    )
    print(done.stderr)
    assert done.returncode == 1
    assert f"{source} line 7: not JSON" in done.stderr
    assert f"{source} line 31: no 'dialogue' field with text" in done.stderr
    assert "48 summaries written to" in done.stderr and "2 line(s) rejected (lines 7, 31)" in done.stderr
    written = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(written) == 48
    assert [w["line"] for w in written] == [n for n in range(1, 51) if n not in (7, 31)]
    assert {w["id"] for w in written} == {f"d{n}" for n in range(1, 51)} - {"d7", "d31"}


MERGED_CHECK = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, prompts = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        texts.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    print(json.dumps({"texts": texts, "peft_imported": "peft" in sys.modules, "dtype": str(model.dtype)}))
    """
)


def test_export_model_merged_loads_without_peft_and_summarizes_as_base_plus_adapter(three_runs, tmp_path, monkeypatch):
    home, _, decisions = three_runs
    monkeypatch.setenv("LORASUM_HOME", str(home))
    adapter_id = decisions[-1]["challenger"]
    out = tmp_path / "merged"
    assert main(["export-model", adapter_id, str(out), "--merged"]) == 0
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "| bertscore_f1 |" in card

    from lorasum_assets.ml.data.prompts import encode_prompt
    from lorasum_assets.ml.data.readers import read_sample
    from lorasum_assets.ml.generation.generate import generate_with_adapter
    from lorasum_assets.ml.models.loading import ModelSpec, load_model, load_tokenizer
    from lorasum_assets.settings.specs import TINY_MODEL, GenerationSpec
    from lorasum_assets.store.registry import find_adapter

    con = history_of(home)
    adapter = find_adapter(con, adapter_id)
    con.close()
    spec = ModelSpec(model=TINY_MODEL, cache_dir=str(home / "models"))
    tokenizer = load_tokenizer(spec)
    dialogues = [r.values["dialogue"] for r in read_sample()["test"][:8]]
    prompts = [encode_prompt(tokenizer, d, False, 2048, "natural")[0] for d in dialogues]
    ours = generate_with_adapter(load_model(spec), adapter.path, tokenizer, prompts,
                                 GenerationSpec(max_new_tokens=16, batch_size=1, precision="as_loaded"))
    plain = subprocess.run([sys.executable, "-c", MERGED_CHECK, str(out), json.dumps(prompts)], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    loaded = json.loads(plain.stdout.strip().splitlines()[-1])
    assert loaded["peft_imported"] is False and loaded["dtype"] == "torch.float32"
    assert loaded["texts"] == [g.text for g in ours]
    assert len(set(loaded["texts"])) > 1

    folder = tmp_path / "adapter"
    assert main(["export-model", adapter_id, str(folder)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}
    assert "library_name: peft" in (folder / "README.md").read_text()
    assert main(["export-model", adapter_id, str(folder)]) == 1  # not empty: refuses without --force


DECIDE_AT_ONCE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from contextlib import contextmanager
    from lorasum_assets.settings.specs import PromotionSpec
    from lorasum_assets.store.lake import connect, history_location, prepare
    from lorasum_assets.store.aliases import AliasKey, find_evaluation
    from lorasum_assets.defs.assets.promotion import Challenge, decide_promotion

    catalog, run_id, barrier = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    location = history_location(catalog, str(barrier / "data") + "/")
    prepare(location)
    calls = []

    @contextmanager
    def connect_after_both_have_read():
        calls.append(1)
        # calls: 1 finds the evaluation, 2 reads the scores and the holder (none yet), 3 records:
        # neither records before both have read
        if len(calls) == 3:
            (barrier / run_id).touch()
            while len(list(barrier.glob("run-*"))) < 2:
                time.sleep(0.01)
        con = connect(location, read_only=False)
        try:
            yield con
        finally:
            con.close()

    with connect_after_both_have_read() as con:
        evaluation = find_evaluation(con, run_id)

    def no_scoring(adapter_id):
        raise AssertionError("the champion's scores are in the history")

    row = decide_promotion(connect_after_both_have_read, Challenge(run_id, evaluation, AliasKey("production", "base-m", "sample"),
                           PromotionSpec()), no_scoring, lambda m: print(m, file=sys.stderr))
    print(json.dumps(row, default=str))
    """
)


def _seed_two_evaluations(location):
    """Runs A and B on the same 12 examples: A's adapter beats the base, B's beats A's."""
    from datetime import datetime

    from lorasum_assets.store.lake import connect, prepare
    from lorasum_assets.store.writes import write_evaluation

    prepare(location)
    con = connect(location, read_only=False)
    for run_id, lift in (("run-a", 0.10), ("run-b", 0.20)):
        examples = []
        for i in range(12):
            base = 0.50 + 0.01 * (i % 4)
            for model, value in (("base", base), ("tuned", base + lift + 0.002 * (i % 3))):
                examples.append(dict(run_id=run_id, model=model, id=f"ex{i}", prediction="p", new_tokens=3, hit_limit=False,
                                     bertscore_precision=value, bertscore_recall=value, bertscore_f1=value, rouge1=value,
                                     rouge2=value, rougeL=value, rougeLsum=value, scorer_hash="scorer"))
        write_evaluation(
            con,
            dict(run_id=run_id, created_at=datetime(2026, 1, 1), profile="tiny", params={}, code_version="t", base_model="base-m",
                 dataset_hash="same-examples", split="test", n_examples=12, adapter_id=f"adapter-{run_id[-1]}",
                 adapter_sha256=None, scorer_hash="scorer"),
            [], examples, scope=dict(dataset="sample", generation_hash="g"),
        )
    con.close()


def _two_runs_decide_at_once(catalog: str, tmp_path):
    from lorasum_assets.store.lake import history_location, open_history

    location = history_location(catalog, str(tmp_path / "data") + "/")
    _seed_two_evaluations(location)
    env = {**os.environ, "LORASUM_HOME": str(tmp_path / "home")}
    processes = [
        subprocess.Popen([sys.executable, "-c", DECIDE_AT_ONCE, catalog, run_id, str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for run_id in ("run-a", "run-b")
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        print(err)
        assert process.returncode == 0, err
    con = open_history(location=location)
    rows = con.execute(
        "SELECT run_id, decision, adapter_id, previous_adapter_id, compared_with, delta FROM promotions ORDER BY promotion_id"
    ).fetchall()
    held = con.execute("SELECT adapter_id FROM production_adapters").fetchall()
    con.close()
    print(rows)
    first, second = rows
    # the later decision was made again against the adapter the earlier one promoted
    assert first[1] == "promoted" and first[3] is None and first[4] == "base"
    assert second[3] == first[2] and second[4] == first[2]
    assert any("deciding again against" in err for _, err in outputs)
    if first[0] == "run-a":  # B beats A by about 0.1 on every example: promoted over A
        assert second[:3] == ("run-b", "promoted", "adapter-b") and second[5] == pytest.approx(0.1, abs=0.01)
    else:  # A, judged against B, loses by about 0.1: kept out
        assert second[:3] == ("run-a", "kept", "adapter-a") and second[5] == pytest.approx(-0.1, abs=0.01)
    assert held == [("adapter-b",)]


def test_two_runs_deciding_at_once_leave_one_holder_and_never_judge_against_a_stale_one(tmp_path, monkeypatch):
    catalog = f"sqlite:{tmp_path / 'catalog.sqlite'}"
    _two_runs_decide_at_once(catalog, tmp_path)

    # a retried promotion step of the same run returns its decision, and appends none
    from contextlib import contextmanager

    from lorasum_assets.defs.assets.promotion import Challenge, decide_promotion
    from lorasum_assets.settings.specs import PromotionSpec
    from lorasum_assets.store.aliases import AliasKey, find_evaluation
    from lorasum_assets.store.lake import connect, history_location

    monkeypatch.setenv("LORASUM_HOME", str(tmp_path / "home"))
    location = history_location(catalog)

    @contextmanager
    def history():
        con = connect(location, read_only=False)
        try:
            yield con
        finally:
            con.close()

    with history() as con:
        evaluation = find_evaluation(con, "run-a")
    logged = []
    row = decide_promotion(history, Challenge("run-a", evaluation, AliasKey("production", "base-m", "sample"), PromotionSpec()),
                           lambda _: pytest.fail("nothing to score"), logged.append)
    assert row["run_id"] == "run-a" and logged == [f"this run already decided: {row['reason']}"]
    with history() as con:
        assert con.execute("SELECT count(*) FROM promotions").fetchone()[0] == 2


def test_two_runs_deciding_at_once_on_a_postgres_history(postgres_server, tmp_path):
    _two_runs_decide_at_once(postgres_server, tmp_path)
