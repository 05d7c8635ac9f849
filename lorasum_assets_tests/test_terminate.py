"""Terminate, as the UI's button sends it (GraphQL terminateRun to the webserver), with the code
server, the daemon and the webserver as separate processes on the instance `make ui` uses
(deploy/dagster.yaml). A terminated training run is canceled, registers no adapter and keeps a
checkpoint that the next run with the same settings resumes from; a terminated generation step
leaves no predictions the report could read."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from lorasum_assets.store import open_history
from lorasum_assets_tests.dagster_processes import Deployment, finished, launch, messages_of, run_of, start_deployment, terminate

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# about 900 optimizer steps on the tiny model, long enough to press Terminate in the middle; no
# periodic checkpoint but those at the end of each epoch
EPOCHS = 20
LONG_TRAINING = {"ops": {"lora_adapter": {"config": {"epochs": EPOCHS, "batch_size": 1, "gradient_accumulation_steps": 1,
                                                       "checkpoint_steps": 100_000}}}}


def history_rows(env: dict[str, str], sql: str, *params) -> list[tuple]:
    os.environ["LORASUM_HOME"] = env["LORASUM_HOME"]
    con = open_history()
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def checkpoint_steps(home: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (home / "checkpoints").glob("*/step-*/COMPLETE"))


def step_status(deployment: Deployment, run_id: str, step: str) -> str | None:
    return next((s["status"] for s in run_of(deployment, run_id)["stepStats"] if s["stepKey"] == step), None)


def test_terminate_keeps_a_checkpoint_the_next_run_resumes_from(tmp_path, monkeypatch):
    home = tmp_path / "lorasum-home"
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster-home"), "LORASUM_HOME": str(home),
           "LORASUM_PROFILE": "tiny", "HF_HUB_OFFLINE": "1"}
    monkeypatch.setenv("LORASUM_HOME", str(home))
    deployment = start_deployment(tmp_path, env, REPO / "deploy" / "dagster.yaml")
    try:
        # Terminate in the middle of training
        first = launch(deployment, LONG_TRAINING)
        deployment.wait_until("training step 5", lambda: any(
            (m := re.match(r"step (\d+)/", message)) and int(m.group(1)) >= 5 for message in messages_of(deployment, first)), timeout=300)
        answer = terminate(deployment, first)
        assert answer["__typename"] == "TerminateRunSuccess", answer
        canceled = deployment.wait_until(f"run {first} to end", lambda: finished(deployment, first), timeout=120)
        assert canceled["status"] == "CANCELED", canceled
        kept = checkpoint_steps(home)
        print(f"terminated run {first}: {canceled['status']}; checkpoints on disk at steps {kept}; "
              f"last step logged {history_rows(env, 'SELECT max(step) FROM training_steps WHERE run_id = ?', first)[0][0]}")
        [(last_step,)] = history_rows(env, "SELECT max(step) FROM training_steps WHERE run_id = ?", first)
        # the newest checkpoint holds the last step the run made (an epoch end or the one left on the way out)
        assert kept and max(kept) == last_step, (kept, last_step, messages_of(deployment, first)[-6:])
        assert history_rows(env, "SELECT count(*) FROM adapters") == [(0,)]

        # the same settings again: resumes from that checkpoint, says so, and finishes
        second = launch(deployment, LONG_TRAINING)
        done = deployment.wait_until(f"run {second} to finish", lambda: finished(deployment, second), timeout=600)
        assert done["status"] == "SUCCESS", done
        messages = messages_of(deployment, second)
        resumed = [m for m in messages if m.startswith("resuming from the checkpoint at step")]
        print(f"next run {second}: {done['status']}; {resumed[0] if resumed else 'no resume line'}")
        assert resumed and f"at step {max(kept)} of " in resumed[0]
        assert any(re.match(rf"resumed from checkpoint at step {max(kept)} of \d+", m) for m in messages)
        [(adapter_id,)] = history_rows(env, "SELECT adapter_id FROM adapters")

        # Terminate while the base model generates (slowly: 400 new tokens, one dialogue at a time)
        slow = {"ops": {"base_predictions": {"config": {"max_new_tokens": 400, "batch_size": 1}},
                        "tuned_predictions": {"config": {"adapter_id": adapter_id}}}}
        third = launch(deployment, slow, job="evaluate")
        deployment.wait_until("base_predictions to start", lambda: step_status(deployment, third, "base_predictions") == "IN_PROGRESS",
                              timeout=300)
        time.sleep(2.0)
        assert terminate(deployment, third)["__typename"] == "TerminateRunSuccess"
        stopped = deployment.wait_until(f"run {third} to end", lambda: finished(deployment, third), timeout=120)
        assert stopped["status"] == "CANCELED", stopped
        written = history_rows(env, "SELECT count(*) FROM base_predictions WHERE run_id = ?", third)
        evaluated = history_rows(env, "SELECT count(*) FROM eval_runs WHERE run_id = ?", third)
        print(f"terminated generation run {third}: {stopped['status']}; base_predictions rows {written[0][0]}, eval_runs rows {evaluated[0][0]}")
        assert written == [(0,)] and evaluated == [(0,)]
    finally:
        deployment.stop()
