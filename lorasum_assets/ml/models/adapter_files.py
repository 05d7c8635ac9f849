"""The adapter folder: written atomically, hashed, and checked for an adapter that changes nothing."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterFilesError(RuntimeError):
    """A registered adapter whose files are not the ones it was registered with."""

    status = "damaged"


class AdapterMissingError(AdapterFilesError):
    status = "missing"


def verify_adapter_files(adapter_id: str, folder: str | Path, registered_sha256: str) -> Path:
    """The adapter's folder, after checking that its weights hash to what the registry recorded.
    Every reader of an adapter's files calls this before it uses them; it raises, naming the file
    and both hashes, when they differ or the files are gone."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        where = f"the folder {folder} is gone" if not folder.exists() else f"{', '.join(missing)} missing in {folder}"
        raise AdapterMissingError(f"adapter {adapter_id} cannot be used: {where}; the registry still lists it "
                                  f"(weights sha256 {registered_sha256})")
    actual = sha256_file(weights)
    if actual != registered_sha256:
        raise AdapterFilesError(f"adapter {adapter_id} is damaged: {weights} has sha256 {actual}, "
                                f"the registry recorded {registered_sha256}; refusing to use it")
    return folder


def lora_b_all_zero(adapter_file: Path) -> bool:
    """True when every LoRA B matrix in a saved adapter is still zero: the adapter changes nothing."""
    with safe_open(str(adapter_file), framework="pt") as weights:
        b_keys = [k for k in weights.keys() if "lora_B" in k]
        return bool(b_keys) and all(not weights.get_tensor(k).any() for k in b_keys)


class AdapterWriteError(OSError):
    """The adapter folder could not be written; nothing was left that looks like an adapter."""


def trainable_bytes(peft_model) -> int:
    """What the trainable (LoRA) weights take, as saved."""
    return sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)


def _size(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def write_failure(what: str, folder: Path, needed_bytes: int, exc: BaseException, error: type[OSError]) -> OSError:
    """The error for a failed write of ``what`` into ``folder``, read before the partial files go.
    safetensors and torch.save report a full disk as their own errors, not as ENOSPC, so a full
    disk is recognised by the free space left, not by the wording."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    out_of_space = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or free < needed_bytes
    if out_of_space:
        return error(errno.ENOSPC, f"no space left to write {what} in {folder}: it needs at least {_size(needed_bytes)}, "
                                   f"{_size(free)} free there when it failed; nothing was kept")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return error(f"cannot write {what} to {folder}: {reason}")


def save_adapter(peft_model, tokenizer, target: Path) -> Path:
    """Write the adapter folder (the notebook's ``training-output/`` layout) atomically.

    Everything goes to a hidden staging folder first and is renamed into place, so a crash or a
    full disk never leaves a folder that looks complete.
    """
    target = Path(target)
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        peft_model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        missing = [name for name in ADAPTER_FILES if not (staging / name).exists()]
        if missing:
            raise AdapterWriteError(f"adapter save did not write {missing}")
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except AdapterWriteError:
        raise
    except Exception as exc:
        raise write_failure("the adapter", target.parent, trainable_bytes(peft_model), exc, AdapterWriteError) from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return target
