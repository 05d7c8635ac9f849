"""The Kubernetes configuration: pods, tags and executors per deployment."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorasum_assets.runtime.deployment import CPU_POD_CONFIG, K8S_CONFIG_TAG

REPO = Path(__file__).resolve().parents[1]
GPU_ASSETS = {"lora_adapter", "base_predictions", "tuned_predictions", "promoted_adapter"}

# One interpreter imports the heavy libraries once, then forks a child per environment: each
# child imports the definitions afresh under its own LORASUM_* variables, as a new process would.
LOAD_DEFINITIONS_PER_ENV = """
import json, os, sys, traceback
import bert_score, dagster, datasets, peft, torch, transformers  # noqa: F401
results = []
for env in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.environ.update(env)
        try:
            from lorasum_assets.definitions import defs
            repo = defs.get_repository_def()
            job = repo.get_job("train_and_evaluate")
            tags = {node.name: dict(node.definition.tags) for node in job.graph.nodes}
            out = {"ok": True, "executor": job.executor_def.name, "tags": tags, "job_tags": dict(job.tags)}
        except BaseException:
            out = {"ok": False, "error": traceback.format_exc()}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    results.append(json.loads(data))
print(json.dumps(results))
"""
ENVIRONMENTS = {
    "k8s-steps": {"LORASUM_DEPLOYMENT": "k8s-steps", "LORASUM_HISTORY": "postgres:host=db dbname=lorasum",
                  "LORASUM_TRAINING_GPUS": "2", "LORASUM_PROFILE": "tiny"},
    "k8s-run": {"LORASUM_DEPLOYMENT": "k8s-run", "LORASUM_PROFILE": "tiny"},
    "k8s-steps without a shared history": {"LORASUM_DEPLOYMENT": "k8s-steps"},
    "local": {"LORASUM_DEPLOYMENT": "local", "LORASUM_PROFILE": "tiny"},
    "unknown": {"LORASUM_DEPLOYMENT": "swarm"},
}


@pytest.fixture(scope="module")
def definitions_per_env() -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_DEFINITIONS_PER_ENV, json.dumps(list(ENVIRONMENTS.values()))],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return dict(zip(ENVIRONMENTS, json.loads(completed.stdout.strip().splitlines()[-1]), strict=True))


def load_definitions(loaded: dict, name: str) -> dict:
    result = loaded[name]
    assert result["ok"], result.get("error")
    return result


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


def test_k8s_steps_definitions_load_and_gpu_steps_request_gpus(definitions_per_env):
    loaded = load_definitions(definitions_per_env, "k8s-steps")
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


def test_k8s_run_definitions_size_the_run_pod_for_a_gpu(definitions_per_env):
    loaded = load_definitions(definitions_per_env, "k8s-run")
    assert loaded["executor"] == "in_process"  # the whole run in one pod: the model loads once
    run_pod = step_pod(loaded["job_tags"], {})
    assert run_pod.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert run_pod.node_selector == {"nvidia.com/gpu.present": "true"}


def refusal(loaded: dict, name: str) -> str:
    """The error of loading the definitions under environment ``name``, which must fail."""
    assert not loaded[name]["ok"]
    return loaded[name]["error"]


def test_k8s_steps_without_a_shared_database_is_refused(definitions_per_env):
    assert "set LORASUM_HISTORY=postgres:<conninfo>" in refusal(definitions_per_env, "k8s-steps without a shared history")


def test_local_definitions_keep_the_in_process_executor(definitions_per_env):
    loaded = load_definitions(definitions_per_env, "local")
    assert loaded["executor"] == "in_process"


def test_an_unknown_deployment_is_named_in_the_error(definitions_per_env):
    assert "LORASUM_DEPLOYMENT='swarm'; valid: local, k8s-run, k8s-steps" in refusal(definitions_per_env, "unknown")


def test_helm_values_name_what_the_code_reads():
    import yaml

    from lorasum_assets.runtime.deployment import DEPLOYMENTS, SECRETS_NAME

    values = yaml.safe_load((REPO / "deploy" / "k8s" / "values.yaml").read_text())
    [location] = values["dagster-user-deployments"]["deployments"]
    env = {e["name"]: e["value"] for e in location["env"]}
    assert env["LORASUM_DEPLOYMENT"] in DEPLOYMENTS
    assert location["dagsterApiGrpcArgs"] == ["-m", "lorasum_assets.definitions"]
    assert [s["name"] for s in location["envSecrets"]] == [SECRETS_NAME]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    mounted = {m["mountPath"] for m in location["volumeMounts"]}
    assert env["LORASUM_HOME"] in mounted
