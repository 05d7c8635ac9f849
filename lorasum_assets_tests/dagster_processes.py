"""Dagster run the way deployments run it: a code server, the daemon and the webserver, each its
own process in its own working directory, driven through the webserver's GraphQL API as the UI
drives it. Used by the PostgreSQL deployment test and the Terminate test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
LOCATION = "lorasum"
REPOSITORY = "__repository__"
POOL_STEPS = ("lora_adapter", "base_predictions", "tuned_predictions")  # the lorasum_gpu pool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_process_group(process: subprocess.Popen, first: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Send ``first`` to the process's whole group (Dagster's servers and their children do not end
    promptly on SIGTERM), then SIGKILL if it has not ended within ``timeout``."""
    for sig in (first, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue


class Deployment:
    """The three Dagster processes, started and stopped as their own process groups."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.grpc_port, self.web_port = free_port(), free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self.workspace = root / "workspace.yaml"
        self.workspace.write_text(json.dumps({"load_from": [{"grpc_server": {
            "host": "127.0.0.1", "port": self.grpc_port, "location_name": LOCATION}}]}))

    def start(self, name: str, command: list[str]) -> None:
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        log = open(folder / "log", "a")
        self.processes[name] = subprocess.Popen(command, cwd=folder, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def start_code_server(self) -> None:
        self.start("code-server", [str(BIN / "dagster"), "api", "grpc", "-m", "lorasum_assets.definitions",
                                   "-h", "127.0.0.1", "-p", str(self.grpc_port)])

    def start_all(self) -> None:
        self.start_code_server()
        self.start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(self.workspace)])
        self.start("webserver", [str(BIN / "dagster-webserver"), "-w", str(self.workspace), "-h", "127.0.0.1",
                                 "-p", str(self.web_port)])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        end_process_group(self.processes.pop(name), sig)

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM)

    def log(self, name: str) -> str:
        path = self.root / name / "log"
        return path.read_text()[-3000:] if path.exists() else ""

    def graphql(self, query: str, **variables) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.web_port}/graphql",
                                         data=json.dumps({"query": query, "variables": variables}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"GraphQL answered {error.code}: {error.read().decode()[:2000]}") from error
        assert "errors" not in answer, answer["errors"]
        return answer["data"]

    def wait_until(self, what: str, check, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    pytest.fail(f"the {name} exited while waiting for {what}:\n{self.log(name)}")
            try:
                value = check()
            except (OSError, AssertionError, KeyError, TypeError):
                # not there yet: the server away, or a GraphQL answer of another shape while the
                # code location reloads (an error type where the check reads a field); the timeout
                # still ends a wait that never comes true, with the servers' logs
                value = None
            if value:
                return value
            time.sleep(2)
        logs = "\n".join(f"--- {name}\n{self.log(name)}" for name in ("code-server", "daemon", "webserver"))
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def start_deployment(root: Path, env: dict[str, str], instance_config: Path) -> Deployment:
    """The instance ``instance_config`` set up in ``env``'s DAGSTER_HOME, then the three processes,
    returned once the webserver has loaded the code location. The caller stops it."""
    subprocess.run([str(BIN / "lorasum"), "init-instance", "--config", str(instance_config)],
                   env=env, check=True, capture_output=True, timeout=300)
    deployment = Deployment(root, env)
    deployment.start_all()
    try:
        deployment.wait_until("the webserver to load the code location", lambda: deployment.graphql(
            "{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name } } } }"
        )["repositoriesOrError"].get("nodes"), timeout=180)
    except BaseException:
        deployment.stop()
        raise
    return deployment


LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } } } }"""
RUN = """query($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run {
  status tags { key value } stepStats { stepKey status startTime endTime } } } }"""
RUN_LOG = """query($runId: ID!) { logsForRun(runId: $runId, limit: 2000) { __typename ... on EventConnection {
  events { __typename ... on MessageEvent { message stepKey } ... on ExecutionStepFailureEvent { error { message causes { message stack } } } } } } }"""
START_SENSOR = """mutation($selector: SensorSelector!) { startSensor(sensorSelector: $selector) { __typename ... on PythonError { message } } }"""
START_SCHEDULE = """mutation($selector: ScheduleSelector!) { startSchedule(scheduleSelector: $selector) { __typename ... on PythonError { message } } }"""
STOP_SCHEDULE = """mutation($id: String!) { stopRunningSchedule(id: $id) { __typename ... on PythonError { message } } }"""
SENSOR_TICKS = """query($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) { __typename ... on Sensor {
  sensorState { ticks(limit: 5) { status skipReason runIds } } } } }"""
SCHEDULE_TICKS = """query($selector: ScheduleSelector!) { scheduleOrError(scheduleSelector: $selector) { __typename ... on Schedule {
  scheduleState { id ticks(limit: 5) { status skipReason runIds } } } } }"""
TERMINATE = """mutation($runId: String!) { terminateRun(runId: $runId) { __typename
  ... on TerminateRunSuccess { run { runId } } ... on TerminateRunFailure { message } ... on PythonError { message } } }"""
RELOAD = """mutation { reloadRepositoryLocation(repositoryLocationName: "lorasum") { __typename
  ... on WorkspaceLocationEntry { locationOrLoadError { __typename } } } }"""


def selector(**names: str) -> dict:
    return {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, **names}


def launch(deployment: Deployment, run_config: dict | None = None, job: str = "train_and_evaluate") -> str:
    answer = deployment.graphql(LAUNCH, params={"selector": selector(jobName=job), "runConfigData": run_config or {}})
    launched = answer["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def terminate(deployment: Deployment, run_id: str) -> dict:
    """What the UI's Terminate button sends."""
    return deployment.graphql(TERMINATE, runId=run_id)["terminateRun"]


def messages_of(deployment: Deployment, run_id: str) -> list[str]:
    return [e["message"] for e in deployment.graphql(RUN_LOG, runId=run_id)["logsForRun"]["events"] if e.get("message")]


def run_of(deployment: Deployment, run_id: str) -> dict:
    return deployment.graphql(RUN, runId=run_id)["runOrError"]


def finished(deployment: Deployment, run_id: str) -> dict | None:
    run = run_of(deployment, run_id)
    return run if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None


def errors_of(deployment: Deployment, run_id: str) -> list[str]:
    events = deployment.graphql(RUN_LOG, runId=run_id)["logsForRun"]["events"]
    return [" / caused by: ".join([e["error"]["message"], *(c["message"] + "".join(c["stack"][-3:]) for c in e["error"]["causes"])])[-3000:]
            for e in events if e.get("error")]


def pool_intervals(run: dict) -> list[tuple[float, float, str]]:
    return [(s["startTime"], s["endTime"], s["stepKey"]) for s in run["stepStats"] if s["stepKey"] in POOL_STEPS]
