"""Training through Dagster Pipes in `accelerate launch` processes, and 2-process DDP on gloo."""

import math
from pathlib import Path

import dagster as dg
import pytest
from safetensors.torch import load_file

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.ml.training.distributed import micro_batch_seed, window_share
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets_tests.helpers import history_of

TRAINING_ASSETS = ["raw_dialogsum", "filtered_split", "tokenized_dataset", "lora_adapter"]
# Same seed, same examples per optimizer step; the two runs differ only in how floating-point sums
# are ordered (gradient all-reduce, threads per process).
FINAL_LOSS_RTOL = 1e-3
ADAPTER_WEIGHT_ATOL = 1e-3


@pytest.mark.parametrize("n_micro,world", [(4, 1), (4, 2), (3, 2), (1, 2), (5, 3), (2, 4)])
def test_window_share_gives_every_micro_batch_to_exactly_one_process(n_micro, world):
    shares = [window_share(n_micro, rank, world) for rank in range(world)]
    real = sorted(i for share in shares for i in share if i is not None)
    assert real == list(range(n_micro))
    assert len({len(share) for share in shares}) == 1  # the same number of backward passes everywhere
    assert len(shares[0]) == math.ceil(n_micro / world)


def test_micro_batch_seeds_differ_between_steps_and_micro_batches():
    seeds = {micro_batch_seed(42, step, micro) for step in range(50) for micro in range(-1, 4)}
    assert len(seeds) == 50 * 5


def train_through_dagster(home: Path, training_config: dict):
    result = dg.materialize(
        [a for a in ALL_ASSETS if a.key.path[-1] in TRAINING_ASSETS],
        selection=TRAINING_ASSETS,
        resources=build_resources(get_profile("tiny")),
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"lora_adapter": {"config": training_config}}},
    )
    assert result.success
    [materialization] = result.asset_materializations_for_node("lora_adapter")
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    con = history_of(home)
    steps = con.execute("SELECT step, loss FROM training_steps ORDER BY step").fetchall()
    path, sha = con.execute("SELECT path, sha256 FROM adapters").fetchone()
    con.close()
    return metadata, steps, Path(path), sha


@pytest.mark.slow  # two accelerate processes and a third in-process training: 14 s
def test_two_gloo_processes_through_pipes_match_in_process_training(fresh_home, tmp_path, monkeypatch):
    config = {"epochs": 2, "lora_dropout": 0.1, "mixed_precision": "no"}
    single_home = fresh_home
    single, single_steps, single_path, _ = train_through_dagster(single_home, config)

    pipes_home = tmp_path / "pipes_home"
    pipes_home.mkdir()
    (pipes_home / "models").symlink_to(single_home / "models", target_is_directory=True)
    monkeypatch.setenv("LORASUM_HOME", str(pipes_home))
    ddp, ddp_steps, ddp_path, ddp_sha = train_through_dagster(
        pipes_home, {**config, "launcher": "accelerate", "num_processes": 2, "threads_per_process": 1}
    )

    # Streamed back from the main training process through Pipes.
    assert ddp["launcher"] == "accelerate" and ddp["world_size"] == 2
    assert ddp["backend"] == "gloo" and ddp["distributed_type"] == "MULTI_CPU"
    assert ddp["real_tokens_per_second"] > 0 and ddp["train_seconds"] > 0
    assert single["launcher"] == "in_process" and single["world_size"] == 1

    # The adapter the workers saved is the one registered.
    files = {p.name for p in ddp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert ddp["sha256_prefix"] == ddp_sha[:16]
    assert not list((pipes_home / "jobs").glob("*.json"))  # the job file does not outlive the run

    # Same optimizer steps, every one logged once, and the same training within tolerance.
    assert ddp["optimizer_steps"] == single["optimizer_steps"] == 22  # ceil(44 / 4) x 2 epochs
    assert [s for s, _ in ddp_steps] == [s for s, _ in single_steps] == list(range(1, 23))
    assert ddp["padding_efficiency"] == single["padding_efficiency"]
    assert math.isclose(ddp["final_train_loss"], single["final_train_loss"], rel_tol=FINAL_LOSS_RTOL)
    worst_step_gap = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(ddp_steps, single_steps))
    print(f"largest relative step-loss gap, 2 processes vs 1: {worst_step_gap:.2e}")
    assert worst_step_gap < FINAL_LOSS_RTOL, (ddp_steps, single_steps)
    assert ddp["val_losses"] == pytest.approx(single["val_losses"], rel=FINAL_LOSS_RTOL)
    ddp_weights = load_file(str(ddp_path / "adapter_model.safetensors"))
    single_weights = load_file(str(single_path / "adapter_model.safetensors"))
    assert ddp_weights.keys() == single_weights.keys()
    worst_weight_gap = max((ddp_weights[n] - t).abs().max().item() for n, t in single_weights.items())
    print(f"largest adapter weight gap: {worst_weight_gap:.2e}")
    assert worst_weight_gap < ADAPTER_WEIGHT_ATOL


def test_in_process_launcher_refuses_several_processes(fresh_home):
    with pytest.raises(ValueError, match="num_processes > 1 needs launcher='accelerate'"):
        dg.materialize(
            [a for a in ALL_ASSETS if a.key.path[-1] in TRAINING_ASSETS],
            selection=TRAINING_ASSETS,
            resources=build_resources(get_profile("tiny")),
            instance=dg.DagsterInstance.ephemeral(),
            run_config={"ops": {"lora_adapter": {"config": {"num_processes": 2}}}},
        )
