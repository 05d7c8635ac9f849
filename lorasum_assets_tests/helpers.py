"""Helpers the test modules share: seeded histories, example data, error text, processes and servers.
Fixtures live in conftest.py; test modules import helpers from here, never from each other."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from lorasum_assets.ml.data.prompts import encode_example, encode_prompt
from lorasum_assets.ml.training.batching import TrainExample
from lorasum_assets.store.lake import history_location
from lorasum_assets.store.writes import write_evaluation


def history_of(home):
    """The history a lorasum home holds, opened read-only (as a notebook would)."""
    from lorasum_assets.store.lake import open_history

    return open_history(location=history_location(f"sqlite:{home}/history/catalog.sqlite"))


class PostgresServer(dict):
    """A running server's connection fields (``host``, ``port``, ``user``, ``socket_dir``), and
    ``stop()``/``start()`` to take it away and bring it back on the same socket and data."""

    def __init__(self, bin_dir: Path, data: Path, root: Path, port: int, listen: str) -> None:
        super().__init__(socket_dir=str(root), host="127.0.0.1" if listen != "''" else str(root), port=str(port), user="lorasum")
        self._pg_ctl, self._data, self._log = str(bin_dir / "pg_ctl"), str(data), str(root / "log")
        self._options = f"-k {root} -p {port} -c listen_addresses={listen}"

    def start(self) -> None:
        subprocess.run(_as_postgres([self._pg_ctl, "-D", self._data, "-l", self._log, "-w", "start", "-o", self._options]),
                       check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(_as_postgres([self._pg_ctl, "-D", self._data, "-m", mode, "-w", "stop"]), capture_output=True)


@contextlib.contextmanager
def running_postgres(databases: tuple[str, ...] = ("lorasum",), port: int = 55439, on_loopback: bool = False) -> Iterator[PostgresServer]:
    """A real PostgreSQL server (Debian's postgresql package) with ``databases``, on a socket of its
    own and, with ``on_loopback``, on 127.0.0.1 too; trust authentication as user ``lorasum``."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    bin_dir = found[-1].parent
    root = Path(tempfile.mkdtemp(prefix="lorasum-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, listen = root / "data", "127.0.0.1" if on_loopback else "''"
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "lorasum"]),
                   check=True, capture_output=True)
    server = PostgresServer(bin_dir, data, root, port, listen)
    server.start()
    try:
        for db in databases:
            subprocess.run(_as_postgres([str(bin_dir / "createdb"), "-h", str(root), "-p", str(port), "-U", "lorasum", db]), check=True)
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def good(split, i):
    return {"id": f"{split}_{i}", "dialogue": f"#Person1#: Hello number {i}.\n#Person2#: Hi.", "summary": f"They greet {i}.", "topic": "t"}


def error_text(result, node=None):
    """Every message in the failure's cause chain: of one step, or (node=None) of every failure in the run."""
    if node is not None:
        failures = [result.failure_data_for_node(node).error]
    else:
        failures = [e.event_specific_data.error for e in result.all_events
                    if e.is_failure and getattr(e.event_specific_data, "error", None) is not None]
    messages = []
    for failure in failures:
        while failure is not None:
            messages.append(failure.message)
            failure = failure.cause
    return "\n".join(messages)


def seed_run(con, run_id, created_at, adapter, f1_base, f1_tuned, per_example, dataset="d1", scorer="s1"):
    metrics = []
    for model, value in (("base", f1_base), ("tuned", f1_tuned), ("delta", f1_tuned - f1_base)):
        metrics.append(dict(run_id=run_id, model=model, metric="bertscore_f1", reference_set="all", value=value, ci_low=value - 0.01, ci_high=value + 0.01, scorer_hash=scorer))
    examples = []
    for ex_id, (b, t) in per_example.items():
        for model, f1 in (("base", b), ("tuned", t)):
            examples.append(dict(run_id=run_id, model=model, id=ex_id, prediction=f"{model} {ex_id}", new_tokens=3, hit_limit=False,
                                 bertscore_precision=f1, bertscore_recall=f1, bertscore_f1=f1, rouge1=0.0, rouge2=0.0, rougeL=0.0, rougeLsum=0.0, scorer_hash=scorer))
    run = dict(run_id=run_id, created_at=created_at, profile="tiny", params={"seed": 0}, code_version="0.1.0", base_model="m",
               dataset_hash=dataset, split="test", n_examples=len(per_example), adapter_id=adapter, adapter_sha256="sha-" + adapter, scorer_hash=scorer)
    write_evaluation(con, run, metrics, examples)


def examples(tokenizer, n, split="train"):
    text = resources.files("lorasum_assets").joinpath("sample_data/dialogues.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if json.loads(line)["split"] == split][:n]
    out = []
    for row in rows:
        e = encode_example(tokenizer, row["dialogue"], row["summary"], 512)
        out.append(TrainExample(e.input_ids, e.labels))
    return out


def prompts(tokenizer, split="test"):
    text = resources.files("lorasum_assets").joinpath("sample_data/dialogues.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if json.loads(line)["split"] == split]
    return [encode_prompt(tokenizer, r["dialogue"])[0] for r in rows]


def model_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([prompt])).logits[0, -1].float()


REPO = Path(__file__).resolve().parents[1]


MATERIALIZE = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "lorasum_assets.definitions"]


LORASUM = [sys.executable, "-m", "lorasum_assets.tools.cli"]


TINY_STEPS = 11 * 2  # ceil(44 train examples / batch 4) optimizer steps per epoch x 2 epochs


def environment(home: Path) -> dict[str, str]:
    return {**os.environ, "LORASUM_HOME": str(home), "LORASUM_PROFILE": "tiny", "DAGSTER_HOME": str(home / "dagster")}


def init_instance(home: Path, config: str | None = None) -> None:
    command = [*LORASUM, "init-instance"] + (["--config", config] if config else [])
    done = subprocess.run(command, env=environment(home), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def start(home: Path, selection: str = "*", run_config: dict | None = None) -> subprocess.Popen:
    command = [*MATERIALIZE, "--select", selection]
    if run_config:
        path = home / f"run-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(run_config))
        command += ["-c", str(path)]
    return subprocess.Popen(command, cwd=REPO, env=environment(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output = process.communicate(timeout=timeout)[0]
    assert process.returncode == 0, output[-4000:]
    return output


def open_instance(home: Path) -> dg.DagsterInstance:
    from dagster._core.instance.ref import InstanceRef

    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home / "dagster")))


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command
