"""lora_adapter: LoRA/QLoRA training, registered in DuckDB with its sha256 and losses."""

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from lorasum_assets.defs.assets.data import read_examples, require
from lorasum_assets.defs.assets.plots import line_plot
from lorasum_assets.defs.assets.plots import table as table_value
from lorasum_assets.defs.resources import LoraModelResource, LorasumStore, ProfileResource
from lorasum_assets.defs.resources.preflight import RunPreflightResource
from lorasum_assets.ml.models.adapter_files import lora_b_all_zero, sha256_file
from lorasum_assets.ml.progress import Progress
from lorasum_assets.ml.training.records import StepLog, TrainingRequest, TrainResult, epoch_summary, step_summary
from lorasum_assets.runtime.deployment import gpu_op_tags, training_gpus
from lorasum_assets.runtime.home import from_home, home_subdir, lorasum_home
from lorasum_assets.settings.config import config_class, resolve, spec_fields
from lorasum_assets.settings.specs import LauncherSpec, TrainSpec
from lorasum_assets.settings.versions import code_version
from lorasum_assets.store.pending import PendingRegistration, record_registration, write_pending
from lorasum_assets.store.references import AdapterRef, TableRef, version_of
from lorasum_assets.store.transactions import HistoryUnreachableError

if TYPE_CHECKING:
    from lorasum_assets.ml.training.batching import TrainExample

GPU_POOL = "lorasum_gpu"


TrainingConfig = config_class(
    "TrainingConfig",
    TrainSpec,
    "Every training knob; unset fields take the run's profile's value (the notebook's recipe for llama-3.2-3b-qlora).",
    **spec_fields(LauncherSpec, note="Unset: the built-in default."),
)


def _read_examples(con, ref: TableRef, split: str) -> tuple[list["TrainExample"], str]:
    from lorasum_assets.ml.training.batching import TrainExample

    rows = read_examples(con, ref, split)
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row).encode())
    return [TrainExample(ids, labels) for _, ids, labels in rows], digest.hexdigest()


@dataclass(frozen=True)
class TrainingJob:
    """One training's inputs, the same whichever launcher runs it."""

    spec: TrainSpec
    train_key: str
    data_hash: str
    train_examples: list["TrainExample"]
    val_examples: list["TrainExample"]
    checkpoint_dir: Path
    target: Path
    adapter_id: str
    created_at: datetime

    @property
    def request(self) -> TrainingRequest:
        return TrainingRequest(spec=self.spec, train_examples=self.train_examples, val_examples=self.val_examples,
                               checkpoint_dir=self.checkpoint_dir, adapter_dir=self.target)


class TrainingCurves:
    """TensorBoard event files per run under ``$LORASUM_HOME/tensorboard/<run id>`` (`make tensorboard`)."""

    def __init__(self, run_id: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = home_subdir("tensorboard", run_id)
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def step(self, log: StepLog) -> None:
        self.writer.add_scalar("train/loss", log.loss, log.step)
        self.writer.add_scalar("train/learning_rate", log.learning_rate, log.step)
        if log.grad_norm is not None:
            self.writer.add_scalar("train/grad_norm", log.grad_norm, log.step)

    def validation(self, step: int, val_loss: float | None) -> None:
        if val_loss is not None:
            self.writer.add_scalar("validation/loss", val_loss, step)

    def close(self) -> None:
        self.writer.close()


def _train_in_process(context, job: TrainingJob, model, store) -> TrainResult:
    from lorasum_assets.ml.training.batching import planned_steps
    from lorasum_assets.ml.training.checkpoints import complete_checkpoints
    from lorasum_assets.ml.training.run import TrainingHooks, train_adapter

    total = planned_steps(len(job.train_examples), job.spec)
    progress: Progress | None = None
    curves = TrainingCurves(context.run.run_id)
    last_step = 0

    # Step and epoch logs reach the history from a thread of their own: a busy store delays the
    # write, never the next training step.
    history_log = store.training_log_writer(job.train_key, context.run.run_id, on_error=context.log.warning)

    def on_step(log: StepLog) -> None:
        nonlocal progress, last_step
        progress = progress or Progress(total, "steps")
        last_step = log.step
        context.log.info(f"step {progress.line(log.step)}: {step_summary(log)}")
        curves.step(log)
        history_log.put(("step", log))

    def on_epoch(epoch: int, val_loss: float | None) -> None:
        context.log.info(epoch_summary(epoch, val_loss))
        curves.validation(last_step, val_loss)
        history_log.put(("epoch", (epoch, val_loss)))

    context.log.info(f"training {total} optimizer steps on {len(job.train_examples)} examples; curves in {curves.folder}")
    saved = complete_checkpoints(job.checkpoint_dir)
    if saved:
        context.log.info(f"resuming from the checkpoint at {saved[-1].name.replace('-', ' ')} of {total} ({saved[-1]}), "
                         "left by an earlier run with the same settings, data and base model")
    try:
        result = train_adapter(job.request, load=lambda: (model.tokenizer(context.log.info), model.fresh_model(context.log.info)),
                               hooks=TrainingHooks(on_step=on_step, on_epoch=on_epoch))
    finally:
        history_log.close("the live training log")
    curves.close()
    if result.resumed_from_step:
        context.log.info(f"resumed from checkpoint at step {result.resumed_from_step} of {result.total_steps}")
    return result


def _train_with_accelerate(context, job: TrainingJob, launcher: LauncherSpec, model, pipes_client) -> TrainResult:
    """Training in ``accelerate launch`` processes, reporting back through Dagster Pipes."""
    from lorasum_assets.workers.train_worker import RESULT_MESSAGE, accelerate_launch_command, write_job

    model.release_base(context.log.info)  # each worker loads its own copy, on GPU 0 too
    job_path = write_job(home_subdir("jobs") / f"{context.run.run_id}-{job.train_key}.json", model=model.spec(), request=job.request)
    command = accelerate_launch_command(job_path, launcher.num_processes, launcher.threads_per_process)
    context.log.info(f"launching: {' '.join(command)}")
    env = {"HF_TOKEN": model.hf_token} if model.hf_token else {}
    try:
        invocation = pipes_client.run(context=context, command=command, env=env)
    finally:
        job_path.unlink(missing_ok=True)
    invocation.get_materialize_result()
    results = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and m.get("kind") == RESULT_MESSAGE]
    if len(results) != 1 or not (job.target / "adapter_model.safetensors").exists():
        raise RuntimeError(f"the training process ended without reporting its result and adapter ({len(results)} result messages)")
    result = TrainResult.from_message(results[0]["record"])
    curves = TrainingCurves(context.run.run_id)  # the worker processes report their steps at the end
    for log in result.steps:
        curves.step(log)
    curves.close()
    return result


@dg.asset(
    group_name="training",
    kinds={"pytorch", "duckdb"},
    code_version=code_version(__name__),
    pool=GPU_POOL,
    op_tags=gpu_op_tags(training_gpus()),
    description=(
        "A LoRA adapter folder (adapter_config.json, adapter_model.safetensors, tokenizer), registered in DuckDB. "
        "Trains in the run's process, or with launcher=accelerate in `accelerate launch` processes through Dagster Pipes."
    ),
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    profile: ProfileResource,
    model: LoraModelResource,
    store: LorasumStore,
    pipes_subprocess_client: dg.PipesSubprocessClient,
    preflight: RunPreflightResource,
    tokenized_dataset: TableRef | None,
) -> dg.Output[AdapterRef]:
    spec: TrainSpec = resolve(profile.get().training, config)
    launcher: LauncherSpec = resolve(LauncherSpec(), config)
    job = _plan(context, spec, model, store, require(tokenized_dataset, "tokenized_dataset"), profile.name)
    if launcher.launcher == "accelerate":
        outcome = _train_with_accelerate(context, job, launcher, model, pipes_subprocess_client)
    else:
        outcome = _train_in_process(context, job, model, store)
    if outcome.total_steps < 1 or not outcome.steps:
        raise RuntimeError(f"training took no optimizer step ({len(job.train_examples)} train examples); no adapter is registered")
    weights_sha = _checked_weights(job, outcome)
    registration, training_config = _registration(context, job, outcome, model, profile.name, weights_sha)
    _register(store, registration)
    shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    context.instance.add_run_tags(context.run.run_id, {"lorasum/adapter_id": job.adapter_id})
    base = model.base_ref()
    version = version_of(weights_sha, base, training_config, tokenized_dataset.data_version)
    ref = AdapterRef(adapter_id=job.adapter_id, path=str(job.target), sha256=weights_sha, base=base, training=training_config,
                     run_id=context.run.run_id, data_version=version)
    return dg.Output(ref, metadata=_adapter_metadata(context, job, outcome, base, weights_sha), data_version=dg.DataVersion(version))


def _plan(context, spec: TrainSpec, model, store, upstream: TableRef, profile_name: str) -> TrainingJob:
    """The examples, their hash, the resume key (config + data + base) and where the adapter goes."""
    with store.connect() as con:
        train_examples, train_hash = _read_examples(con, upstream, "train")
        val_examples, val_hash = _read_examples(con, upstream, "validation")
    data_hash = hashlib.sha256((train_hash + val_hash).encode()).hexdigest()
    base = model.base_ref()
    held, precision = model.planned_quantization(), model.planned_precision(spec.mixed_precision)
    train_key = spec.fingerprint(
        data_hash, f"{base.model}@{base.revision}:{base.quantization}:{held.compute_dtype}:{precision}:{base.fingerprint}"
    )
    created_at = datetime.now(UTC)
    adapter_id = f"{profile_name}-{created_at:%Y%m%d-%H%M%S}-{context.run.run_id[:8]}"
    return TrainingJob(
        spec=spec, train_key=train_key, data_hash=data_hash, train_examples=train_examples, val_examples=val_examples,
        checkpoint_dir=home_subdir("checkpoints", train_key), target=lorasum_home() / "adapters" / adapter_id,
        adapter_id=adapter_id, created_at=created_at,
    )


def _checked_weights(job: TrainingJob, outcome: TrainResult) -> str:
    """The adapter's sha256, once it is known to differ from the base and to be what training reported."""
    weights = job.target / "adapter_model.safetensors"
    if lora_b_all_zero(weights):
        shutil.rmtree(job.target, ignore_errors=True)
        raise RuntimeError(
            f"after {outcome.total_steps} optimizer steps every LoRA B matrix is still zero (learning rate {job.spec.learning_rate}): "
            "the adapter would equal the base model, so it is not registered"
        )
    weights_sha = sha256_file(weights)
    if outcome.adapter_sha256 is not None and outcome.adapter_sha256 != weights_sha:
        raise RuntimeError("the adapter on disk is not the one the training process reported")
    return weights_sha


def _registration(context, job: TrainingJob, outcome: TrainResult, model, profile_name: str, weights_sha: str) -> tuple[PendingRegistration, dict]:
    """The adapter's registry row with this run's whole training log (steps a resumed run took
    over from its checkpoint included), and the training config recorded with it."""
    base = model.base_ref()
    loaded = outcome.quantization
    if loaded["method"] != base.quantization:
        raise RuntimeError(f"the base model loaded as {loaded['method']}, but this run planned {base.quantization} "
                           f"(its train key and checkpoints say so); not registering the adapter")
    choice = model.choice()
    prompt_format = {"use_chat_template": choice.use_chat_template, "prompt_boundary": choice.prompt_boundary}
    ran = {"compute_dtype": loaded["compute_dtype"], "double_quant": loaded["double_quant"], "precision": outcome.precision}
    training_config = {**asdict(job.spec), **prompt_format, **outcome.launcher, **ran}
    row = {
        "adapter_id": job.adapter_id,
        "run_id": context.run.run_id,
        "train_key": job.train_key,
        "base_model": base.model,
        "base_revision": base.revision,
        "base_quantization": loaded["method"],
        "base_fingerprint": base.fingerprint,
        "profile": profile_name,
        "config": {**training_config, "quantization": loaded["method"]},
        "trainable_params": outcome.trainable_params,
        "total_params": outcome.total_params,
        "trainable_percent": 100.0 * outcome.trainable_params / max(outcome.total_params, 1),
        "final_train_loss": outcome.final_train_loss,
        "final_val_loss": outcome.final_val_loss,
        "dataset_hash": job.data_hash,
        "sha256": weights_sha,
        "path": str(job.target),
        "optimizer_steps": outcome.total_steps,
        "created_at": job.created_at.replace(tzinfo=None),
    }
    epochs = list(enumerate(outcome.val_losses, start=1))
    return PendingRegistration(row, list(outcome.steps), epochs), training_config


def _register(store: LorasumStore, registration: PendingRegistration) -> None:
    """Into the history; kept on disk first, so that an adapter whose registration the history
    server could not take is registered later by ``lorasum recover``."""
    pending = write_pending(registration)
    try:
        with store.connect() as con:
            record_registration(con, registration)
    except HistoryUnreachableError as exc:
        raise HistoryUnreachableError(
            f"{exc}. The adapter {registration.adapter_id} is saved at {registration.adapter['path']} and waits in "
            f"{pending}; run `lorasum recover` once the server is back to register it"
        ) from exc
    pending.unlink()


def _adapter_metadata(context, job: TrainingJob, outcome: TrainResult, base, weights_sha: str) -> dict:
    from lorasum_assets.ml.models.devices import take_peak_gpu_memory

    steps = [log.step for log in outcome.steps]
    losses = [log.loss for log in outcome.steps]
    metadata = {
        "adapter_id": job.adapter_id,
        "path": from_home(job.target),
        "sha256_prefix": weights_sha[:16],
        "train_key": job.train_key,
        "base_model": base.model,
        "quantization": outcome.quantization["method"],
        "compute_dtype": outcome.quantization["compute_dtype"],
        "precision": outcome.precision,
        "skipped_steps": outcome.skipped_steps,
        **outcome.launcher,
        "trainable_params": outcome.trainable_params,
        "total_params": outcome.total_params,
        "trainable_percent": round(100.0 * outcome.trainable_params / max(outcome.total_params, 1), 4),
        "optimizer_steps": outcome.total_steps,
        "resumed_from_step": outcome.resumed_from_step,
        "final_train_loss": None if outcome.final_train_loss is None else round(outcome.final_train_loss, 4),
        "val_losses": [round(v, 4) for v in outcome.val_losses if v is not None],
        "padding_efficiency": outcome.padding_efficiency,
        "train_seconds": round(outcome.seconds, 2),
        **take_peak_gpu_memory(),  # in this process: the in-process launcher's training
        "config": dg.MetadataValue.json(asdict(job.spec)),
    }
    if steps:
        metadata["loss_curve"] = line_plot({"train loss": (steps, losses)}, "Training loss", "optimizer step", "loss")
        metadata["loss_curve_points"] = table_value(
            ("step", "loss", "lr", "grad norm"),
            [(log.step, round(log.loss, 4), float(f"{log.learning_rate:.3g}"), None if log.grad_norm is None else float(f"{log.grad_norm:.4g}"))
             for log in outcome.steps],
            descriptions={"loss": "training loss of the optimizer step", "lr": "learning rate", "grad norm": "gradient norm before clipping"},
        )
        metadata["tensorboard"] = from_home(home_subdir("tensorboard", context.run.run_id))
    return metadata
