"""The PostgreSQL history server goes away while a run trains (LORASUM_HISTORY=postgres:...):
stopped for 30 s and started again, the run finishes with its whole history written once; kept
down past LORASUM_HISTORY_WAIT_S, the run fails naming the server, the adapter stays on disk and
`lorasum recover` registers it once the server is back."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from lorasum_assets.store.lake import history_location, open_history
from lorasum_assets_tests.dagster_processes import free_port
from lorasum_assets_tests.helpers import running_postgres

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MATERIALIZE = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "lorasum_assets.definitions"]
# a few hundred optimizer steps on the tiny model: training is still logging steps when the server goes
LONGER_TRAINING = {"ops": {"lora_adapter": {"config": {"epochs": 6, "batch_size": 1, "gradient_accumulation_steps": 1}}}}
OUTAGE_S = 30.0


def environment(tmp_path: Path, catalog: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "LORASUM_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster"),
            "LORASUM_PROFILE": "tiny", "HF_HUB_OFFLINE": "1", "LORASUM_HISTORY": catalog,
            "LORASUM_HISTORY_DATA": f"{tmp_path}/lake-data/", **extra}


def materialize(tmp_path: Path, env: dict[str, str], selection: str) -> subprocess.Popen:
    (tmp_path / "dagster").mkdir(exist_ok=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(LONGER_TRAINING))
    return subprocess.Popen([*MATERIALIZE, "--select", selection, "-c", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def read_until_training(process: subprocess.Popen, lines: list[str]) -> None:
    """Collects the run's output, returning once training has logged its tenth step."""
    for line in process.stdout:
        lines.append(line)
        if "step 10/" in line:
            return
    raise AssertionError("the run ended before training logged 10 steps:\n" + "".join(lines[-40:]))


def rest_of_output(process: subprocess.Popen, lines: list[str], timeout: float = 600) -> str:
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    process.wait(timeout=timeout)
    reader.join(10)
    return "".join(lines)


def history(catalog: str, sql: str) -> list[tuple]:
    with open_history(location=history_location(catalog)) as con:
        return con.execute(sql).fetchall()


def test_a_run_outlasts_a_30_s_history_server_restart_and_writes_everything_once(tmp_path):
    with running_postgres(port=free_port()) as server:
        catalog = f"postgres:dbname=lorasum host={server['host']} port={server['port']} user={server['user']}"
        env = environment(tmp_path, catalog)
        process = materialize(tmp_path, env, "*")
        lines: list[str] = []
        read_until_training(process, lines)
        server.stop()
        stopped_at = time.monotonic()
        time.sleep(OUTAGE_S)
        server.start()
        print(f"history server stopped at training step 10 for {time.monotonic() - stopped_at:.1f}s")
        output = rest_of_output(process, lines)
        assert process.returncode == 0, output[-4000:]

        waits = [line for line in output.splitlines() if "is unreachable" in line]
        backs = [line for line in output.splitlines() if "answers again after" in line]
        print("\n".join(waits + backs))
        # training is the one step running while the server is away: one wait, reported once
        assert len(waits) == 1 and len(backs) == 1, waits + backs
        assert f"the history server (postgres:dbname=lorasum host={server['host']} port={server['port']}" in waits[0]

        [(run_id, steps)] = history(catalog, "SELECT run_id, optimizer_steps FROM adapters")
        counts = {
            "training_steps": history(catalog, f"SELECT count(*), count(DISTINCT step) FROM training_steps WHERE run_id = '{run_id}'")[0],
            "training_epochs": history(catalog, f"SELECT count(*), count(DISTINCT epoch) FROM training_epochs WHERE run_id = '{run_id}'")[0],
            "base_predictions": history(catalog, f"SELECT count(*), count(DISTINCT id) FROM base_predictions WHERE run_id = '{run_id}'")[0],
            "tuned_predictions": history(catalog, f"SELECT count(*), count(DISTINCT id) FROM tuned_predictions WHERE run_id = '{run_id}'")[0],
            "eval_runs": history(catalog, f"SELECT count(*), count(DISTINCT run_id) FROM eval_runs WHERE run_id = '{run_id}'")[0],
        }
        print(f"run {run_id}: {steps} optimizer steps; (rows, distinct keys) per table: {counts}")
        assert counts["training_steps"] == (steps, steps)
        assert counts["training_epochs"] == (6, 6)
        assert counts["base_predictions"] == counts["tuned_predictions"] == (12, 12)
        assert counts["eval_runs"] == (1, 1)
        assert history(catalog, "SELECT count(*) FROM adapters") == [(1,)]


def test_a_server_down_past_the_wait_fails_naming_it_and_recover_registers_the_adapter(tmp_path):
    with running_postgres(port=free_port()) as server:
        catalog = f"postgres:dbname=lorasum host={server['host']} port={server['port']} user={server['user']}"
        env = environment(tmp_path, catalog, LORASUM_HISTORY_WAIT_S="5")
        process = materialize(tmp_path, env, "*lora_adapter")
        lines: list[str] = []
        read_until_training(process, lines)
        server.stop()
        output = rest_of_output(process, lines)
        assert process.returncode != 0, output[-4000:]
        failure = next((line for line in output.splitlines() if "lorasum recover" in line), output[-4000:])
        print(failure)
        assert f"host={server['host']} port={server['port']}" in failure and "LORASUM_HISTORY_WAIT_S" in failure
        assert "run `lorasum recover` once the server is back" in failure
        home = tmp_path / "home"
        [adapter] = [p for p in (home / "adapters").iterdir() if not p.name.startswith(".")]
        assert (adapter / "adapter_model.safetensors").is_file()
        assert [p.name for p in (home / "pending").glob("*.json")] == [f"{adapter.name}.json"]

        server.start()
        recover = subprocess.run([sys.executable, "-m", "lorasum_assets.tools.cli", "recover"], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=120)
        print(recover.stdout)
        assert recover.returncode == 0, recover.stderr
        assert f"{adapter.name}" in recover.stdout and "registered" in recover.stdout
        [(adapter_id, run_id, steps, path)] = history(catalog, "SELECT adapter_id, run_id, optimizer_steps, path FROM adapters")
        assert (adapter_id, path) == (adapter.name, str(adapter))
        assert history(catalog, f"SELECT count(*), count(DISTINCT step) FROM training_steps WHERE run_id = '{run_id}'") == [(steps, steps)]
        assert not list((home / "pending").glob("*.json"))
        again = subprocess.run([sys.executable, "-m", "lorasum_assets.tools.cli", "recover"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "0 adapter(s) saved by a run but not registered" in again.stdout
