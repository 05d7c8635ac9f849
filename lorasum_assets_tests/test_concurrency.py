"""Runs as they overlap in real use: several processes at once on one home, a run killed with
SIGKILL, a brand-new Dagster home, and a sweep. Each run is its own `dagster` process."""

import json
import os
import signal
import subprocess
import time
from importlib import resources
from pathlib import Path

import dagster as dg
import pytest

from lorasum_assets.store.lake import HistoryNotFoundError
from lorasum_assets_tests.helpers import (
    LORASUM,
    MATERIALIZE,
    REPO,
    TINY_STEPS,
    environment,
    finish,
    history_of,
    init_instance,
    open_instance,
    start,
)


def database(home: Path):
    return history_of(home)




@pytest.mark.slow  # 35-45 s; test_history_readers runs three at once under a polling reader
def test_two_whole_graph_runs_at_once_each_evaluate_their_own_adapter(fresh_home):
    init_instance(fresh_home)
    rates = (1e-3, 5e-3)
    runs = [start(fresh_home, "*", {"ops": {"lora_adapter": {"config": {"learning_rate": rate}}}}) for rate in rates]
    for run in runs:
        finish(run)

    con = database(fresh_home)
    evaluations = con.execute(
        """SELECT e.run_id, e.adapter_id, a.run_id, CAST(a.config->>'learning_rate' AS DOUBLE)
           FROM eval_runs e JOIN adapters a USING (adapter_id) ORDER BY 4"""
    ).fetchall()
    assert len(evaluations) == 2 and len({adapter for _, adapter, _, _ in evaluations}) == 2
    with open_instance(fresh_home) as instance:
        for eval_run, adapter_id, trained_in, rate in evaluations:
            assert eval_run == trained_in, f"run {eval_run} scored adapter {adapter_id} trained in run {trained_in}"
            given = instance.get_run_by_id(eval_run).run_config["ops"]["lora_adapter"]["config"]["learning_rate"]
            assert rate == given
            steps = [r[0] for r in con.execute("SELECT step FROM training_steps WHERE run_id = ? ORDER BY step", [eval_run]).fetchall()]
            assert steps == list(range(1, TINY_STEPS + 1))
            tuned_with = {r[0] for r in con.execute("SELECT adapter_id FROM tuned_predictions_by_run WHERE run_id = ?", [eval_run]).fetchall()}
            assert tuned_with == {adapter_id}
    assert sorted(r for *_, r in evaluations) == sorted(rates)


@pytest.mark.slow  # runs a real job, kills it mid-step and runs it again: 30-40 s
def test_a_run_killed_in_training_does_not_block_the_next_one(fresh_home):
    init_instance(fresh_home, "deploy/dagster.yaml")  # the pool lorasum_gpu limited to 1
    killed = start(fresh_home, "*lora_adapter", {"ops": {"lora_adapter": {"config": {"epochs": 60}}}})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and killed.poll() is None:
            try:
                with database(fresh_home) as con:
                    if con.execute("SELECT count(*) FROM training_steps").fetchone()[0] >= 3:
                        break
            except HistoryNotFoundError:
                pass  # the run has not created the history yet
            time.sleep(0.2)
        assert killed.poll() is None, "training ended before it could be killed"
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)

    started = time.monotonic()
    output = finish(start(fresh_home, "lora_adapter", {"ops": {"lora_adapter": {"config": {"epochs": 1}}}}), timeout=240)
    assert time.monotonic() - started < 240
    assert "freed the pool slots of 1 dead run(s)" in output
    with open_instance(fresh_home) as instance:
        statuses = sorted(run.status.value for run in instance.get_runs())
        assert statuses == ["FAILURE", "SUCCESS"]
        failed = next(run for run in instance.get_runs() if run.status == dg.DagsterRunStatus.FAILURE)
        assert not instance.event_log_storage.get_concurrency_run_ids() - {failed.run_id}


@pytest.mark.slow
def test_four_first_runs_at_once_on_a_fresh_home(fresh_home):
    command = f"{' '.join(LORASUM)} init-instance --config deploy/dagster.yaml && {' '.join(MATERIALIZE)} --select raw_dialogsum,filtered_split"
    runs = [subprocess.Popen(["bash", "-c", command], cwd=REPO, env=environment(fresh_home), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    for run in runs:
        finish(run)
    with open_instance(fresh_home) as instance:
        assert [run.status for run in instance.get_runs()] == [dg.DagsterRunStatus.SUCCESS] * 4
    finish(start(fresh_home, "raw_dialogsum"))  # the home stays usable


@pytest.mark.slow
def test_a_sweep_trains_evaluates_and_ranks_each_point_on_its_own_adapter(fresh_home):
    init_instance(fresh_home)
    grid = fresh_home / "grid.yaml"
    grid.write_text("lora_adapter:\n  learning_rate: [0.003, 0.01]\n  target_modules: [[q_proj, v_proj], [all-linear]]\n")
    # --data: a local folder of the sample's dialogues with 5 of its 12 test dialogues, so the points must score on it
    sample = [json.loads(line) for line in resources.files("lorasum_assets").joinpath("sample_data/dialogues.jsonl").read_text().splitlines()]
    kept = [row for row in sample if row["split"] != "test"] + [row for row in sample if row["split"] == "test"][:5]
    (fresh_home / "data").mkdir()
    (fresh_home / "data" / "dialogues.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
    done = subprocess.run([*LORASUM, "sweep", str(grid), "--parallel", "3", "--json", "--data", str(fresh_home / "data")], cwd=REPO,
                          env=environment(fresh_home), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    ranking = json.loads(done.stdout)["rows"]
    points = {f"learning_rate={rate},target_modules={targets}" for rate in (0.003, 0.01) for targets in (["q_proj", "v_proj"], ["all-linear"])}
    assert {row["point"] for row in ranking} == points and len(ranking) == 4
    assert [row["rank"] for row in ranking] == sorted(row["rank"] for row in ranking)
    assert all(row["best_adapters_rank"] >= 1 for row in ranking)
    con = database(fresh_home)
    adapted = {"[q_proj, v_proj]": {"q_proj", "v_proj"}, "[all-linear]": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}
    for row in ranking:
        trained_in, rate, path = con.execute(
            "SELECT run_id, CAST(config->>'learning_rate' AS DOUBLE), path FROM adapters WHERE adapter_id = ?", [row["adapter_id"]]
        ).fetchone()
        assert trained_in == row["run_id"] and row["point"].startswith(f"learning_rate={rate:g},")
        targets = json.loads((Path(path) / "adapter_config.json").read_text())["target_modules"]
        assert {t.split(".")[-1] for t in targets} == adapted[row["point"].split("target_modules=")[1].replace("'", "")]
        assert con.execute("SELECT n_examples FROM eval_runs WHERE run_id = ?", [row["run_id"]]).fetchone()[0] == 5
    assert con.execute("SELECT count(*) FROM adapters").fetchone()[0] == 4
    best = subprocess.run([*LORASUM, "adapters", "--best", "--json"], cwd=REPO, env=environment(fresh_home), capture_output=True, text=True)
    assert {row["adapter_id"] for row in json.loads(best.stdout)["rows"]} == {row["adapter_id"] for row in ranking}
