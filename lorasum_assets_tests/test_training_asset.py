"""lora_adapter as users run it: killed mid-run with SIGKILL, then materialized again."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorasum_assets.store.lake import HistoryNotFoundError
from lorasum_assets_tests.helpers import history_of

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIG = {"ops": {"lora_adapter": {"config": {"epochs": 12, "checkpoint_steps": 4, "logging_steps": 1}}}}
# The recipe profile (a prequantized 4-bit Llama 3.2, QLoRA, gradient checkpointing, batch 1 x 4)
# on its stand-in, every sample dialogue, 8 epochs: 11 optimizer steps per epoch.
RECIPE_RUN_CONFIG = {
    "ops": {"raw_dialogsum": {"config": {"source": "sample"}}, "filtered_split": {"config": {"modulus": 1}},
            "lora_adapter": {"config": {"epochs": 8, "checkpoint_steps": 4, "logging_steps": 1}}},
    "resources": {"model": {"config": {"model": "builtin:tiny-llama-3.2-bnb-4bit"}}},
}
CASES = {"tiny": (RUN_CONFIG, 11 * 12), "llama-3.2-3b-qlora": (RECIPE_RUN_CONFIG, 11 * 8)}


def materialize(home: Path, selection: str, config_file: Path, profile: str = "tiny") -> subprocess.Popen:
    env = {**os.environ, "LORASUM_HOME": str(home), "LORASUM_PROFILE": profile, "DAGSTER_HOME": str(home / "dagster")}
    (home / "dagster").mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "lorasum_assets.definitions",
         "--select", selection, "-c", str(config_file)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )


def logged_steps(home) -> int:
    try:
        with history_of(home) as con:
            return con.execute("SELECT count(*) FROM training_steps").fetchone()[0]
    except HistoryNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("profile", list(CASES))
def test_killed_training_resumes_and_logs_each_step_once(fresh_home, tmp_path, profile):
    run_config, planned = CASES[profile]
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(run_config))
    prep = materialize(fresh_home, "raw_dialogsum,filtered_split,tokenized_dataset", config_file, profile)
    assert prep.wait(timeout=300) == 0, prep.stdout.read().decode()[-3000:]

    training = materialize(fresh_home, "lora_adapter", config_file, profile)
    checkpoints = fresh_home / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and training.poll() is None:
        # Live step logs reach the history from a writer thread every 2 s: wait until they show the
        # steps up to the checkpoint, so that the killed run leaves a log of its own.
        if any(checkpoints.glob("*/step-*/COMPLETE")) and logged_steps(fresh_home) >= 8:
            break
        time.sleep(0.05)
    assert training.poll() is None, "training finished before it could be killed; make it longer"
    os.killpg(training.pid, signal.SIGKILL)
    training.wait(timeout=60)

    con = history_of(fresh_home)
    logged_before = con.execute("SELECT count(*) FROM training_steps").fetchone()[0]
    assert con.execute("SELECT count(*) FROM adapters").fetchone()[0] == 0  # no half adapter registered
    con.close()
    assert not list((fresh_home / "adapters").glob("*"))

    again = materialize(fresh_home, "lora_adapter", config_file, profile)
    output = again.communicate(timeout=600)[0].decode()
    assert again.returncode == 0, output[-3000:]
    assert "resumed from checkpoint at step" in output

    con = history_of(fresh_home)
    print(f"{profile}: killed after {logged_before} logged steps; "
          f"{next(line for line in output.splitlines() if 'resumed from checkpoint at step' in line).split(' - ')[-1]}")
    assert logged_before >= 8
    assert con.execute("SELECT count(DISTINCT run_id) FROM training_steps").fetchone()[0] == 2
    (resumed_run,) = con.execute("SELECT run_id FROM adapters").fetchone()
    # the resumed run's log holds every step once: those taken over from the checkpoint and its own
    steps = [r[0] for r in con.execute("SELECT step FROM training_steps WHERE run_id = ? ORDER BY step", [resumed_run]).fetchall()]
    assert steps == list(range(1, planned + 1))
    # the killed run's own log is left as it was
    killed = con.execute("SELECT count(*) FROM training_steps WHERE run_id != ?", [resumed_run]).fetchone()[0]
    assert killed == logged_before
    assert con.execute("SELECT count(*) FROM adapters").fetchone()[0] == 1
    adapter_dirs = [p for p in (fresh_home / "adapters").iterdir()]
    assert len(adapter_dirs) == 1 and not adapter_dirs[0].name.startswith(".")


def test_an_adapter_whose_lora_b_is_still_zero_is_never_registered(fresh_home, monkeypatch):
    """Training that leaves every LoRA B matrix at zero would register an adapter equal to the base."""
    import dagster as dg

    import lorasum_assets.ml.training.loop as train_module
    from lorasum_assets.defs.assets import ALL_ASSETS
    from lorasum_assets.defs.resources.factory import build_resources
    from lorasum_assets.ml.training.records import StepLog, TrainResult
    from lorasum_assets.settings.profiles import get_profile

    def no_learning(peft_model, train_examples, val_examples, spec, **kwargs):
        log = StepLog(step=1, epoch=1.0, loss=1.0, learning_rate=spec.learning_rate, grad_norm=0.0, label_tokens=1, seconds=0.0)
        return TrainResult(steps=[log], val_losses=[None], total_steps=1, trainable_params=1, total_params=1)

    monkeypatch.setattr(train_module, "train_lora", no_learning)  # what lora_adapter imports when it runs
    result = dg.materialize(ALL_ASSETS, resources=build_resources(get_profile("tiny")), instance=dg.DagsterInstance.ephemeral(),
                            selection="*lora_adapter", raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("lora_adapter").error
    assert "every LoRA B matrix is still zero" in str(failure.cause.message if failure.cause else failure.message)
    con = history_of(fresh_home)
    assert con.execute("SELECT count(*) FROM adapters").fetchone()[0] == 0
    assert not list((fresh_home / "adapters").glob("*"))


def test_lora_b_all_zero_tells_an_untrained_adapter_from_a_trained_one(tiny_model, tiny_tokenizer, tmp_path):
    from lorasum_assets.ml.data.prompts import encode_example
    from lorasum_assets.ml.models.adapter_files import lora_b_all_zero, save_adapter
    from lorasum_assets.ml.training.batching import TrainExample
    from lorasum_assets.ml.training.loop import train_lora
    from lorasum_assets.ml.training.lora import prepare_peft_model
    from lorasum_assets.settings.specs import TrainSpec

    spec = TrainSpec(epochs=1, batch_size=1, gradient_accumulation_steps=1, max_steps=1, warmup_ratio=0.0, gradient_checkpointing=False)
    peft_model = prepare_peft_model(tiny_model, spec)
    assert lora_b_all_zero(save_adapter(peft_model, tiny_tokenizer, tmp_path / "untrained") / "adapter_model.safetensors")
    example = encode_example(tiny_tokenizer, "#Person1#: Hi.\n#Person2#: Hello.", "They greet.", 128)
    train_lora(peft_model, [TrainExample(example.input_ids, example.labels)], [], spec, tiny_tokenizer.pad_token_id)
    assert not lora_b_all_zero(save_adapter(peft_model, tiny_tokenizer, tmp_path / "trained") / "adapter_model.safetensors")
