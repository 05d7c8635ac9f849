"""GGUF for llama.cpp and Ollama: the merged model and the adapter, converted by llama.cpp's own
converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, from the pinned llama-cpp-python
sdist that ``make setup-gguf`` unpacks), an Ollama Modelfile, and a check by llama.cpp itself: the
GGUF, reloaded with llama-cpp-python, against base + adapter in transformers on the merged check's
prompts. The converters run in a subprocess of their own; nothing here is imported when the code
location loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import PeftModel

from lorasum_assets.ml.data.prompts import render_prompt
from lorasum_assets.ml.export.merged import CHECK_NEW_TOKENS, MergeCheck, MergedModel, greedy_path, judge_paths, merge_adapter
from lorasum_assets.ml.models.adapter_files import write_failure
from lorasum_assets.ml.models.loading import GGUF_PREFIX, ModelSpec, load_model, load_tokenizer, packaged_gguf_path
from lorasum_assets.settings.env import LLAMA_CPP_ENV, get_env

GGUF_TYPES = ("bf16", "f16", "q8_0")
# The largest logit gap (relative to the reference's largest |logit|) and the largest top-two margin
# at a parting that model.gguf may show against base + adapter in transformers, per type: measured
# 0.0087 (bf16), 0.0013 (f16) and 0.0353 (q8_0), partings at margins of 0.0035 at most
# (python -m benchmarks.gguf_tolerance, docs/export.md); about twice to three times that.
GGUF_TOLERANCE = {"bf16": 0.03, "f16": 0.03, "q8_0": 0.07}
# adapter.gguf on the packaged base GGUF (SmolLM2's own Q4_1, which llama.cpp computes with 8-bit
# activations): how far the adapter's effect on the logits may lie from its effect in transformers
# (measured 11.8-13.1% for the three types; 32.2% when lora_B skips the Q/K permutation, 100% for a
# lost adapter), and how near a tie a greedy parting must be (measured 0.0066 at most).
ADAPTER_EFFECT_TOLERANCE = 0.2
PARTING_TOLERANCE = 0.02
PROMPT_PLACEHOLDER = "\x00dialogue\x00"


class GgufExportError(RuntimeError):
    """The GGUF export could not be made, or does not compute what base + adapter computes; nothing was kept."""


class GgufWriteError(OSError):
    """The GGUF export's folder could not be written (a full disk, a read-only folder); nothing was kept."""


@dataclass(frozen=True)
class GgufExport:
    folder: Path
    out_type: str
    merged: MergedModel
    model_check: MergeCheck
    adapter_check: AdapterEffectCheck | None  # None: the base is not a GGUF, so there is no base GGUF to apply it to
    metadata: dict[str, str]


def converters_dir() -> Path:
    """Where llama.cpp's converters are: LORASUM_LLAMA_CPP, else where ``make setup-gguf`` put them."""
    folder = Path(get_env(LLAMA_CPP_ENV) or Path(sys.prefix) / "share" / "llama.cpp")
    if not (folder / "convert_hf_to_gguf.py").exists():
        raise GgufExportError(f"llama.cpp's converters are not in {folder}: run `make setup-gguf` (or set {LLAMA_CPP_ENV})")
    return folder


def llama_cpp_version(folder: Path) -> str:
    version = folder / "VERSION"
    return version.read_text().strip() if version.exists() else f"llama.cpp converters in {folder}"


def check_adapter_convertible(adapter_path: str) -> None:
    """llama.cpp's LoRA converter takes LoRA on linear layers only: refuse one on the embeddings or
    the LM head, or with whole modules saved beside it, before anything loads."""
    config = json.loads((Path(adapter_path) / "adapter_config.json").read_text())
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    refused = sorted({t for t in targets if t.split(".")[-1] in ("embed_tokens", "lm_head")} | set(config.get("modules_to_save") or []))
    if refused:
        raise GgufExportError(f"adapter {adapter_path} adapts or saves {', '.join(refused)}: llama.cpp's LoRA converter takes "
                              "LoRA on linear projections only (target_modules such as q_proj, v_proj)")


def run_converter(folder: Path, script: str, args: list[str], what: str) -> None:
    """One of llama.cpp's converters, in a process of its own; its last lines of output in the error."""
    done = subprocess.run([sys.executable, str(folder / script), *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        said = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        unsupported = next((line for line in said if "not supported" in line), None)
        if any("pre-tokenizer was not recognized" in line for line in said):
            unsupported = ("its tokenizer's pre-tokenizer is not one llama.cpp recognises (convert_hf_to_gguf.py identifies "
                           "a BPE tokenizer by the hash of its output on a fixed text), so it cannot write the tokenizer into the GGUF")
        cause = unsupported or " | ".join(said[-3:]) or f"exit status {done.returncode}"
        raise GgufExportError(f"{script} ({llama_cpp_version(folder)}) could not convert {what}: {cause}")


def ollama_modelfile(source: str, prompt_template: str, stops: list[str], adapter: str | None = None) -> str:
    """An Ollama Modelfile: the GGUF, the prompt lorasum generates with (the dialogue is {{ .Prompt }}),
    greedy decoding and the tokens lorasum stops at."""
    lines = [f"FROM {source}"] + ([f"ADAPTER {adapter}"] if adapter else [])
    lines += [f'TEMPLATE """{prompt_template}"""', "PARAMETER temperature 0", "PARAMETER top_k 1"]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def prompt_template(tokenizer, use_chat_template: bool, boundary: str) -> str:
    return render_prompt(PROMPT_PLACEHOLDER, tokenizer, use_chat_template, boundary).replace(PROMPT_PLACEHOLDER, "{{ .Prompt }}")


@dataclass(frozen=True)
class Reference:
    """Base + adapter in transformers, as lorasum generates with it: each prompt's greedy path with the
    logits of each step, and the base's logits (the adapter disabled) along the same path."""

    paths: list[tuple[list[int], list[int], torch.Tensor]]
    base_logits: list[torch.Tensor]


@torch.no_grad()
def reference(spec: ModelSpec, adapter_path: str, prompts: list[list[int]]) -> Reference:
    model = PeftModel.from_pretrained(load_model(spec), adapter_path, is_trainable=False).eval()
    paths = [(prompt, *greedy_path(model, prompt, CHECK_NEW_TOKENS)) for prompt in prompts]
    base_logits = []
    with model.disable_adapter():
        for prompt, tokens, _ in paths:
            full = torch.tensor([prompt + tokens[:-1]])
            base_logits.append(model(input_ids=full).logits[0, len(prompt) - 1 :].float())
    del model
    return Reference(paths, base_logits)


@dataclass(frozen=True)
class AdapterEffectCheck:
    """adapter.gguf on the base GGUF in llama.cpp: the greedy paths, and the adapter's effect on the
    logits (with it minus without it, both in llama.cpp) against its effect in transformers. The
    difference of the two runs cancels the base GGUF's own quantization, which a plain logit gap
    would mix in; a lost adapter is 100% off, a wrong Q/K layout far off."""

    paths: MergeCheck
    effect_error: float  # the norm of the effect's difference, relative to the norm of the effect in transformers
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.effect_error <= self.tolerance and all(p["margin"] <= self.paths.tolerance for p in self.paths.partings)

    def describe(self) -> str:
        paths = self.paths.describe().split("; largest logit gap")[0]
        return f"{paths}; the adapter's effect on the logits {self.effect_error:.1%} off its effect in transformers (tolerance {self.tolerance:.0%})"


def llama_cpp_logits(model_path: Path, paths, lora_path: Path | None = None) -> tuple[list[torch.Tensor], dict]:
    """The GGUF's logits in llama.cpp, teacher-forced along the reference's paths; with its metadata."""
    # llama_cpp is the optional GGUF install (make setup-gguf): only an export with --gguf needs it
    from llama_cpp import Llama

    longest = max(len(prompt) + len(tokens) for prompt, tokens, _ in paths)
    llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=longest + 8,
                n_batch=longest + 8, logits_all=True, seed=0, verbose=False, n_threads=os.cpu_count())
    logits = []
    for prompt, tokens, _ in paths:
        llm.reset()
        llm.eval(prompt + tokens[:-1])
        logits.append(torch.tensor(llm.scores[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]))
    metadata = dict(llm.metadata)
    llm.close()
    return logits, metadata


def check_gguf_model(model_path: Path, ref: Reference, tolerance: float) -> tuple[MergeCheck, dict]:
    logits, metadata = llama_cpp_logits(model_path, ref.paths)
    return judge_paths(ref.paths, logits, tolerance), metadata


def check_gguf_adapter(base_path: Path, adapter_path: Path, ref: Reference, tolerance: float) -> AdapterEffectCheck:
    with_adapter, _ = llama_cpp_logits(base_path, ref.paths, lora_path=adapter_path)
    without, _ = llama_cpp_logits(base_path, ref.paths)
    paths = judge_paths(ref.paths, with_adapter, PARTING_TOLERANCE)
    found, expected = [], []
    for (_, _, ref_logits), ref_base, ours, ours_base in zip(ref.paths, ref.base_logits, with_adapter, without, strict=True):
        width = min(ref_logits.shape[-1], ours.shape[-1])
        expected.append((ref_logits[:, :width] - ref_base[:, :width]).flatten())
        found.append((ours[:, :width] - ours_base[:, :width]).flatten())
    expected_effect, found_effect = torch.cat(expected), torch.cat(found)
    error = ((found_effect - expected_effect).norm() / expected_effect.norm().clamp_min(1e-9)).item()
    return AdapterEffectCheck(paths, error, tolerance)


def check_metadata(metadata: dict[str, str], tokenizer, stops: list[int], what: Path) -> None:
    """The tokenizer's end of text, chat template and lorasum's stop tokens carried into the GGUF."""
    problems = []
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    if eos is None or int(eos) not in stops:
        problems.append(f"tokenizer.ggml.eos_token_id is {eos}, not one of the stop ids {stops}")
    template = getattr(tokenizer, "chat_template", None)
    if template and metadata.get("tokenizer.chat_template") != template:
        problems.append("tokenizer.chat_template differs from the tokenizer's chat template")
    if problems:
        raise GgufExportError(f"{what}: " + "; ".join(problems))


def export_gguf(spec: ModelSpec, adapter_path: str, out: Path, prompts: list[list[int]], *, out_type: str,
                prompt_format: tuple[bool, str], merge_tolerance: float) -> GgufExport:
    """``out``/model.gguf (base + adapter merged), adapter.gguf, Modelfile (and Modelfile.adapter when
    the base is a GGUF), each checked by llama.cpp against base + adapter in transformers before
    ``out`` is moved into place; on any failure nothing is left."""
    if out_type not in GGUF_TYPES:
        raise GgufExportError(f"GGUF type {out_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    check_adapter_convertible(adapter_path)
    folder = converters_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        result = _export_into(staging, spec=spec, adapter_path=adapter_path, prompts=prompts, out_type=out_type,
                              prompt_format=prompt_format, merge_tolerance=merge_tolerance, folder=folder)
        os.replace(staging, out)
    except OSError as exc:
        raise write_failure("the GGUF export", out.parent, 0, exc, GgufWriteError) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return replace(result, folder=out)


def _export_into(staging: Path, *, spec: ModelSpec, adapter_path: str, prompts, out_type: str, prompt_format, merge_tolerance,
                 folder: Path) -> GgufExport:
    ref = reference(spec, adapter_path, prompts)  # one load of base + adapter serves the merged check and both GGUF checks
    merged = merge_adapter(spec, adapter_path, staging / "merged", prompts, tolerance=merge_tolerance, reference_paths=ref.paths)
    run_converter(folder, "convert_hf_to_gguf.py", [str(merged.folder), "--outtype", out_type, "--outfile", str(staging / "model.gguf")],
                  f"the merged model of {spec.model}")
    run_converter(folder, "convert_lora_to_gguf.py", [adapter_path, "--base", str(merged.folder), "--outtype", out_type,
                                                      "--outfile", str(staging / "adapter.gguf")], f"the adapter {adapter_path}")
    tokenizer = load_tokenizer(spec)
    model_check, metadata = check_gguf_model(staging / "model.gguf", ref, GGUF_TOLERANCE[out_type])
    if not model_check.ok:
        raise GgufExportError(f"model.gguf in llama.cpp does not compute what base + adapter computes: {model_check.describe()}")
    eos = json.loads((merged.folder / "generation_config.json").read_text())["eos_token_id"]  # lorasum's stop ids
    stop_ids = eos if isinstance(eos, list) else [eos]
    check_metadata(metadata, tokenizer, stop_ids, staging / "model.gguf")
    template = prompt_template(tokenizer, *prompt_format)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]
    (staging / "Modelfile").write_text(ollama_modelfile("./model.gguf", template, stops))
    adapter_check = None
    if spec.model.startswith(GGUF_PREFIX):
        base_gguf = packaged_gguf_path(spec.model)
        adapter_check = check_gguf_adapter(base_gguf, staging / "adapter.gguf", ref, ADAPTER_EFFECT_TOLERANCE)
        if not adapter_check.ok:
            raise GgufExportError(f"adapter.gguf on {base_gguf.name} in llama.cpp does not compute what base + adapter computes: "
                                  f"{adapter_check.describe()}")
        (staging / "Modelfile.adapter").write_text(ollama_modelfile(str(base_gguf), template, stops, adapter="./adapter.gguf"))
    shutil.rmtree(merged.folder)
    return GgufExport(folder=staging, out_type=out_type, merged=merged, model_check=model_check, adapter_check=adapter_check,
                      metadata={k: v for k, v in metadata.items() if k.startswith(("general.", "tokenizer.ggml.eos", "tokenizer.ggml.bos"))})
