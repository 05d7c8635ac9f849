"""The Kubernetes configuration and the history shared by runs on many machines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from lorasum_assets.cli import main as cli_main
from lorasum_assets.deployment import CPU_POD_CONFIG, K8S_CONFIG_TAG
from lorasum_assets.store.schema import migrate
from lorasum_assets.store.shared_history import export_run, open_shared_history

REPO = Path(__file__).resolve().parents[1]
GPU_ASSETS = {"lora_adapter", "base_predictions", "tuned_predictions"}

LOAD_K8S_DEFINITIONS = """
import json
from lorasum_assets.definitions import defs
repo = defs.get_repository_def()
job = repo.get_job("train_and_evaluate")
tags = {node.name: dict(node.definition.tags) for node in job.graph.nodes}
print(json.dumps({"executor": job.executor_def.name, "tags": tags, "job_tags": dict(job.tags)}))
"""


def load_definitions(env: dict) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_K8S_DEFINITIONS], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def step_pod(op_tags: dict, executor_step_config: dict):
    """The Kubernetes Job dagster-k8s builds for one step, merged the way its step handler merges
    the executor's step_k8s_config with the op's dagster-k8s/config tag."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )

    context = K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(executor_step_config)).merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(op_tags))
    )
    job_config = DagsterK8sJobConfig(job_image="registry.example/lorasum:1", dagster_home="/opt/dagster/dagster_home",
                                     instance_config_map="dagster-instance")
    job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], "lorasum-step", context.run_k8s_config,
                                    component="step_worker")
    return job.spec.template.spec


def test_k8s_steps_definitions_load_and_gpu_steps_request_gpus():
    loaded = load_definitions({"LORASUM_DEPLOYMENT": "k8s-steps", "LORASUM_DATABASE": "md:lorasum",
                               "LORASUM_TRAINING_GPUS": "2", "LORASUM_PROFILE": "tiny"})
    assert loaded["executor"] == "lorasum_k8s_executor"
    tagged = {name for name, tags in loaded["tags"].items() if K8S_CONFIG_TAG in tags}
    assert tagged == GPU_ASSETS
    assert K8S_CONFIG_TAG not in loaded["job_tags"]

    training_pod = step_pod(loaded["tags"]["lora_adapter"], CPU_POD_CONFIG)
    [container] = training_pod.containers
    assert container.resources.limits["nvidia.com/gpu"] == "2"
    assert container.resources.requests["nvidia.com/gpu"] == "2"
    assert training_pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [t.key for t in training_pod.tolerations] == ["nvidia.com/gpu"]

    generation_pod = step_pod(loaded["tags"]["tuned_predictions"], CPU_POD_CONFIG)
    assert generation_pod.containers[0].resources.limits["nvidia.com/gpu"] == "1"

    data_pod = step_pod(loaded["tags"]["tokenized_dataset"], CPU_POD_CONFIG)
    assert "nvidia.com/gpu" not in (data_pod.containers[0].resources.limits or {})
    assert data_pod.containers[0].resources.requests == {"cpu": "1", "memory": "4Gi"}
    assert not data_pod.tolerations


def test_k8s_run_definitions_size_the_run_pod_for_a_gpu():
    loaded = load_definitions({"LORASUM_DEPLOYMENT": "k8s-run", "LORASUM_PROFILE": "tiny"})
    assert loaded["executor"] == "in_process"  # the whole run in one pod: the model loads once
    run_pod = step_pod(loaded["job_tags"], {})
    assert run_pod.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert run_pod.node_selector == {"nvidia.com/gpu.present": "true"}


def refusal(env: dict) -> str:
    """The error output of loading the definitions under ``env``, which must fail."""
    completed = subprocess.run([sys.executable, "-c", LOAD_K8S_DEFINITIONS], cwd=REPO, env={**os.environ, **env},
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    return completed.stderr


def test_k8s_steps_without_a_shared_database_is_refused():
    assert "set LORASUM_DATABASE=md:<name> (MotherDuck)" in refusal({"LORASUM_DEPLOYMENT": "k8s-steps"})


def test_local_definitions_keep_the_in_process_executor():
    loaded = load_definitions({"LORASUM_DEPLOYMENT": "local", "LORASUM_PROFILE": "tiny"})
    assert loaded["executor"] == "in_process"


def test_an_unknown_deployment_is_named_in_the_error():
    assert "LORASUM_DEPLOYMENT='swarm'; valid: local, k8s-run, k8s-steps" in refusal({"LORASUM_DEPLOYMENT": "swarm"})


def test_helm_values_name_what_the_code_reads():
    import yaml

    from lorasum_assets.deployment import DEPLOYMENTS, SECRETS_NAME

    values = yaml.safe_load((REPO / "deploy" / "k8s" / "values.yaml").read_text())
    [location] = values["dagster-user-deployments"]["deployments"]
    env = {e["name"]: e["value"] for e in location["env"]}
    assert env["LORASUM_DEPLOYMENT"] in DEPLOYMENTS
    assert location["dagsterApiGrpcArgs"] == ["-m", "lorasum_assets.definitions"]
    assert [s["name"] for s in location["envSecrets"]] == [SECRETS_NAME]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    mounted = {m["mountPath"] for m in location["volumeMounts"]}
    assert env["LORASUM_HOME"] in mounted


def seed_pod_database(path: Path, run_id: str, f1_tuned: float) -> None:
    """What one pod's evaluation leaves in its own DuckDB."""
    con = duckdb.connect(str(path))
    migrate(con)
    con.execute("INSERT INTO eval_runs (run_id, created_at, profile, dataset_hash, split, n_examples, scorer_hash) "
                "VALUES (?, now(), 'tiny', 'd1', 'test', 3, 's1')", [run_id])
    for model, value in (("base", 0.5), ("tuned", f1_tuned), ("delta", f1_tuned - 0.5)):
        con.execute("INSERT INTO eval_metrics VALUES (?, ?, 'bertscore_f1', 'all', ?, ?, ?, 's1')",
                    [run_id, model, value, value - 0.01, value + 0.01])
    for i in range(3):
        con.execute("INSERT INTO eval_examples (run_id, model, id, prediction, bertscore_f1) VALUES (?, 'tuned', ?, 'p', ?)",
                    [run_id, f"ex{i}", f1_tuned])
    con.close()


def test_runs_on_two_machines_share_one_history_through_parquet(tmp_path, capsys):
    shared = tmp_path / "object-store" / "lorasum"
    for pod, run_id, f1 in (("pod-a", "run-a", 0.61), ("pod-b", "run-b", 0.72)):
        database = tmp_path / pod / "lorasum.duckdb"
        database.parent.mkdir(parents=True)
        seed_pod_database(database, run_id, f1)
        con = duckdb.connect(str(database))
        assert export_run(con, str(shared), run_id) == {"eval_runs": 1, "eval_metrics": 3, "eval_examples": 3}
        # A retried run rewrites its own files, never adds a second copy.
        assert export_run(con, str(shared), run_id)["eval_runs"] == 1
        con.close()

    history = open_shared_history(str(shared))
    assert history.execute("SELECT count(*) FROM eval_runs").fetchone()[0] == 2
    assert history.execute("SELECT count(*) FROM eval_examples").fetchone()[0] == 6
    best = history.execute("SELECT run_id, value FROM best_adapters WHERE rank = 1").fetchall()
    assert best == [("run-b", 0.72)]

    assert cli_main(["history", "--json", "--history-uri", str(shared)]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert sorted(r["run_id"] for r in rows) == ["run-a", "run-b"]


def test_an_unsafe_run_id_cannot_name_an_export_file(tmp_path):
    con = duckdb.connect()
    migrate(con)
    with pytest.raises(ValueError, match="cannot name a file"):
        export_run(con, str(tmp_path), "../../etc/x")


def test_an_empty_shared_history_reads_as_empty_tables(tmp_path):
    history = open_shared_history(str(tmp_path / "nothing-yet"))
    assert history.execute("SELECT count(*) FROM eval_history").fetchone()[0] == 0


def test_a_run_exports_its_history_when_a_history_uri_is_set(fresh_home, tmp_path, monkeypatch):
    from lorasum_assets_tests.test_pipeline import materialize_all

    shared = tmp_path / "bucket" / "history"
    monkeypatch.setenv("LORASUM_HISTORY_URI", str(shared))
    result = materialize_all()
    assert result.success
    run_id = result.run_id

    history = open_shared_history(str(shared))
    local = duckdb.connect(str(fresh_home / "lorasum.duckdb"), read_only=True)
    for table in ("eval_runs", "eval_metrics", "eval_examples", "adapters", "training_steps", "training_epochs"):
        exported = history.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", [run_id]).fetchone()[0]
        assert exported == local.execute(f"SELECT count(*) FROM {table}").fetchone()[0] > 0, table
    assert sorted(p.name for p in (shared / "eval_runs").iterdir()) == [f"run_id={run_id}.parquet"]
