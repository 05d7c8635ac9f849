"""Where runs execute, chosen by ``LORASUM_DEPLOYMENT``:

- ``local`` (default): every step in the run's own process on this machine.
- ``k8s-run``: dagster-k8s's ``K8sRunLauncher`` (set in the Helm values) starts one pod per run on
  a GPU node; the jobs carry the ``dagster-k8s/config`` tag that asks for it. Steps still share one
  process, so the model loads once per run; every pod writes one shared history, a DuckLake on a
  PostgreSQL catalog (``LORASUM_HISTORY=postgres:...``) with its data files in object storage.
- ``k8s-steps``: dagster-k8s's ``k8s_job_executor``, one pod per step. The GPU steps carry a tag
  asking for GPUs, a GPU node and its taint's toleration; data and report steps get a CPU pod. The
  steps of a run meet in the same shared history.

The op tags are always present and inert outside ``k8s-steps``. Secrets reach the pods from the
Kubernetes secret ``lorasum-secrets`` (``HF_TOKEN``, ``PGPASSWORD``, object-store
credentials), never from run config.
"""

from __future__ import annotations

import dagster as dg

from lorasum_assets.settings.env import DEPLOYMENT_ENV, HISTORY_ENV, TRAINING_GPUS_ENV, get_env

DEPLOYMENTS = ("local", "k8s-run", "k8s-steps")
SECRETS_NAME = "lorasum-secrets"
K8S_CONFIG_TAG = "dagster-k8s/config"


def deployment() -> str:
    name = get_env(DEPLOYMENT_ENV, "local")
    if name not in DEPLOYMENTS:
        raise ValueError(f"{DEPLOYMENT_ENV}={name!r}; valid: {', '.join(DEPLOYMENTS)}")
    return name


def training_gpus() -> int:
    """GPUs for the training pod: launch ``lora_adapter`` with launcher=accelerate and num_processes
    equal to this to use them all."""
    raw = get_env(TRAINING_GPUS_ENV, "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{TRAINING_GPUS_ENV} must be a positive whole number, got {raw!r}")
    return int(raw)


def gpu_pod_config(gpus: int = 1) -> dict:
    """Pod settings for a step that needs ``gpus`` NVIDIA GPUs (device plugin resource name)."""
    return {
        "container_config": {
            "resources": {
                "requests": {"cpu": str(4 * gpus), "memory": f"{24 * gpus}Gi", "nvidia.com/gpu": str(gpus)},
                "limits": {"memory": f"{48 * gpus}Gi", "nvidia.com/gpu": str(gpus)},
            }
        },
        "pod_spec_config": {
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


CPU_POD_CONFIG = {
    "container_config": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}},
}


def gpu_op_tags(gpus: int = 1) -> dict:
    return {K8S_CONFIG_TAG: gpu_pod_config(gpus)}


def run_tags() -> dict:
    """Tags for the jobs: under ``k8s-run`` they size the run's pod for training on GPUs."""
    return {K8S_CONFIG_TAG: gpu_pod_config(training_gpus())} if deployment() == "k8s-run" else {}


def build_executor() -> dg.ExecutorDefinition:
    if deployment() == "k8s-steps":
        if not (get_env(HISTORY_ENV) or "").startswith("postgres:"):
            raise ValueError(
                "LORASUM_DEPLOYMENT=k8s-steps runs each step in its own pod, and they need one history they all "
                f"reach: set {HISTORY_ENV}=postgres:<conninfo> (a DuckLake on PostgreSQL), or use k8s-run"
            )
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor.configured(
            {"step_k8s_config": CPU_POD_CONFIG, "env_secrets": [SECRETS_NAME], "max_concurrent": 4},
            name="lorasum_k8s_executor",
        )
    # One process runs every step, so the model loads once per run and no two processes ever
    # hold it at the same time.
    return dg.in_process_executor
