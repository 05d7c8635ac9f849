"""The one reader of the environment: every variable lorasum reads is named here, once.

Modules ask ``get_env(NAME)``; an unset or empty variable reads as ``default``. (Libraries read
their own variables, such as ``HF_HUB_OFFLINE`` or ``PGPASSWORD``; lorasum never reads those.)
"""

from __future__ import annotations

import os

HOME_ENV = "LORASUM_HOME"
PROFILE_ENV = "LORASUM_PROFILE"
HISTORY_ENV = "LORASUM_HISTORY"
HISTORY_DATA_ENV = "LORASUM_HISTORY_DATA"
HISTORY_WAIT_ENV = "LORASUM_HISTORY_WAIT_S"
DEPLOYMENT_ENV = "LORASUM_DEPLOYMENT"
TRAINING_GPUS_ENV = "LORASUM_TRAINING_GPUS"
RETRAIN_CRON_ENV = "LORASUM_RETRAIN_CRON"
WATCH_PATH_ENV = "LORASUM_WATCH_PATH"
VERBOSE_ENV = "LORASUM_VERBOSE"
DAGSTER_HOME_ENV = "DAGSTER_HOME"
HF_TOKEN_ENV = "HF_TOKEN"
LLAMA_CPP_ENV = "LORASUM_LLAMA_CPP"

VARIABLES = {
    HOME_ENV: "where everything lorasum writes lives (default ./.lorasum)",
    PROFILE_ENV: "the default profile of every run (default smollm2-135m)",
    HISTORY_ENV: "the history's DuckLake catalog: sqlite:PATH or postgres:CONNINFO (default: SQLite in the home)",
    HISTORY_DATA_ENV: "where a new history puts its data files: a folder or s3://...",
    HISTORY_WAIT_ENV: "seconds a run waits for an unreachable PostgreSQL history server before it fails (default 300)",
    DEPLOYMENT_ENV: "where runs execute: local, k8s-run or k8s-steps",
    TRAINING_GPUS_ENV: "GPUs of the training pod under k8s-steps",
    RETRAIN_CRON_ENV: "the weekly_retrain schedule's cron (default 0 3 * * 1)",
    WATCH_PATH_ENV: "the data file or folder the data-change sensor watches",
    VERBOSE_ENV: "1 shows the libraries' known warnings and progress bars that lorasum hides",
    DAGSTER_HOME_ENV: "Dagster's instance folder",
    HF_TOKEN_ENV: "a Hugging Face token for gated models and datasets, and for export-model --push-to-hub",
    LLAMA_CPP_ENV: "the folder with llama.cpp's converters for export-model --gguf (default: the one make setup-gguf fills)",
}


def get_env(name: str, default: str | None = None) -> str | None:
    """The value of the environment variable ``name``, or ``default`` when it is unset or empty."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a variable lorasum reads; name it in lorasum_assets/settings/env.py")
    return os.environ.get(name) or default
