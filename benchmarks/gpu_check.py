"""Does the recipe work on this GPU? One prepared run of under 9 minutes on an H100 or H200
(``bash benchmarks/gpu_check.sh``): each step runs in a process of its own under its own limit,
the limits add up to under 540 s, and a step that runs out of time is reported while the next
one runs.

  env           GPU, memory, driver, CUDA, torch, bitsandbytes, transformers and peft versions
  standin-bf16  the llama-3.2-3b-qlora profile's whole graph on the 2-layer 4-bit Llama 3.2
                stand-in in bf16, then its merged export on the GPU with the self-check
  standin-fp16  the same in fp16 with compute dtype float16 (what a T4 runs), merged export too
  build-3b      the stand-in at Llama 3.2 3B's exact shape (random weights), NF4 with double
                quantization, saved prequantized as unsloth's checkpoint is; made on the GPU
  recipe-3b     a short form of the recipe on it (16 training dialogues, 1 epoch, 32 new tokens,
                the notebook's settings otherwise), then its merged export with the self-check;
                on unsloth/Llama-3.2-3B-Instruct-bnb-4bit itself instead when that is in the
                Hugging Face cache (a user's own GPU), and then build-3b is skipped
  qlora-3b      lorasum_assets_tests/test_gpu_qlora.py with GPU_CHECK_MODEL set to that model
  peer          benchmarks.peer on it: QLoRA training against TRL+PEFT (when TRL is installed),
                generation against plain generate at its best setting, into its own results file

Each step records what ran (quantization, compute dtype, precision, engine, skipped steps, peak
GPU memory), read from what the runs stored, not from what was asked. The summary lands in
benchmarks/results/gpu_check/summary.json and summary.md (GPU_CHECK_OUT names another folder).
GPU_CHECK_DEVICE=cpu is a dry run on the CPU, with the 2-layer stand-in in place of the 3B one.
The scorer is a random 2-layer BERT built here (the MiniLM package cannot travel to a GPU
machine): BERTScore's mechanics are exercised, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_MODEL = "unsloth/Llama-3.2-3B-Instruct-bnb-4bit"
PROFILE = "llama-3.2-3b-qlora"
# step: limit in seconds on a GPU (they add up to 530); a CPU dry run gets LIMIT_SCALE_CPU times as long
LIMITS = {"env": 15, "standin-bf16": 70, "standin-fp16": 70, "build-3b": 60, "recipe-3b": 150, "qlora-3b": 90, "peer": 75}
LIMIT_SCALE_CPU = 3
SHORT_RECIPE = {"filtered_split": {"modulus": 1, "max_rows_per_split": 16}, "lora_adapter": {"epochs": 1},
                "base_predictions": {"max_new_tokens": 32}, "tuned_predictions": {"max_new_tokens": 32}}


# ---- the steps, each run in a process of its own: python -m benchmarks.gpu_check --step NAME --work DIR


def step_env(work: Path, device: str) -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "bitsandbytes": bitsandbytes.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        record.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1), capability=f"sm{props.major}{props.minor}",
                      native_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        record["driver"] = smi.stdout.strip() or "unknown"
    else:
        from lorasum_assets.ml.models.devices import describe_device

        record["gpu"] = f"none (dry run on {describe_device('cpu')})"
    return record


def build_tiny_bert(folder: Path) -> Path:
    """A random 2-layer BERT and a WordPiece tokenizer trained on the bundled sample: a scorer
    that runs BERTScore's code anywhere, with no weights to carry."""
    if (folder / "config.json").exists():
        return folder
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from lorasum_assets.ml.models.tiny import _corpus

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=1000, special_tokens=special, show_progress=False))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                             special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_config(model: str, device: str, scorer: Path, precision: str, compute_dtype: str = "auto", short: bool = False) -> dict:
    ops = {"raw_dialogsum": {"config": {"source": "sample"}}, "lora_adapter": {"config": {"mixed_precision": precision}}}
    if short:
        for op, config in SHORT_RECIPE.items():
            ops.setdefault(op, {"config": {}})["config"].update(config)
    return {"ops": ops, "resources": {
        "model": {"config": {"model": model, "device": device, "compute_dtype": compute_dtype}},
        "scorer": {"config": {"model": "tiny-random-bert", "model_path": str(scorer), "num_layers": 2}},
    }}


def materialized(dagster_home: Path, asset: str) -> dict:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def step_graph(work: Path, device: str, name: str, model: str, precision: str, compute_dtype: str = "auto", short: bool = False) -> dict:
    """The profile's whole graph, then ``lorasum export-model --merged`` of the adapter it trained."""
    import yaml

    home = work / name / "home"
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = work / name / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(model, device, build_tiny_bert(work / "tiny-bert"), precision, compute_dtype, short)))
    env = {**os.environ, "LORASUM_HOME": str(home), "DAGSTER_HOME": str(dagster_home), "LORASUM_PROFILE": PROFILE}
    if not (home / "models").exists():
        (home / "models").symlink_to(work / "models", target_is_directory=True)
    started = time.perf_counter()
    graph = subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "lorasum_assets.definitions", "--select", "*",
                            "-c", str(config)], cwd=ROOT, env=env, capture_output=True, text=True)
    (work / name / "graph.log").write_text(graph.stdout + graph.stderr)
    record: dict = {"graph_exit": graph.returncode, "graph_s": round(time.perf_counter() - started, 1)}
    trained = materialized(dagster_home, "lora_adapter")
    if trained:
        record["training"] = {k: trained.get(k) for k in ("quantization", "compute_dtype", "precision", "skipped_steps", "optimizer_steps",
                                                          "train_seconds", "peak_gpu_memory_gib", "final_train_loss")}
        if trained.get("train_seconds"):
            record["training"]["steps_per_s"] = round(trained["optimizer_steps"] / trained["train_seconds"], 3)
    for asset in ("base_predictions", "tuned_predictions"):
        generated = materialized(dagster_home, asset)
        if generated:
            record[asset] = {k: generated.get(k) for k in ("engine", "engine_dtype", "device", "base_quantization", "base_compute_dtype",
                                                           "new_tokens_per_s", "mean_new_tokens", "peak_gpu_memory_gib")}
    if graph.returncode != 0 or not trained:
        raise SystemExit(f"{name}: the graph failed (exit {graph.returncode}); its log: {work / name / 'graph.log'}\n"
                         + (graph.stdout + graph.stderr)[-3000:])
    export = subprocess.run([sys.executable, "-m", "lorasum_assets.tools.cli", "export-model", trained["adapter_id"], str(work / name / "merged"),
                             "--merged", "--force", "--device", device], cwd=ROOT, env=env, capture_output=True, text=True)
    record["export_exit"] = export.returncode
    record["export"] = [line for line in export.stdout.splitlines() if line.startswith(("merged ", "checked against", "peak GPU"))]
    if export.returncode != 0:
        raise SystemExit(f"{name}: the merged export failed (exit {export.returncode}):\n{(export.stdout + export.stderr)[-3000:]}")
    return record


def real_model_cached() -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(REAL_MODEL, local_files_only=True)
    except Exception:  # not in the cache (or no hub at all): the stand-in it is
        return False
    return True


def model_at_size(work: Path) -> str:
    """What the real-size steps run on: the real checkpoint when cached, else the stand-in build-3b made."""
    return REAL_MODEL if real_model_cached() else str(work / "llama-3.2-3b-shape")


def step_build(work: Path, device: str) -> dict:
    from lorasum_assets.ml.models.tiny import LLAMA32_3B_SHAPE, build_tiny_llama32_bnb_4bit

    if real_model_cached():
        return {"skipped": f"{REAL_MODEL} is in the Hugging Face cache: the real-size steps run on it"}
    started = time.perf_counter()
    # a dry run on the CPU keeps the 2-layer shape: the 3B one is GPU work
    folder = build_tiny_llama32_bnb_4bit(work / "llama-3.2-3b-shape", shape=LLAMA32_3B_SHAPE if device == "cuda" else None, device=device)
    config = json.loads((folder / "config.json").read_text())
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {"folder": str(folder), "seconds": round(time.perf_counter() - started, 1), "size_gb": round(size / 1e9, 2),
            "shape": {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")}}


def step_qlora(work: Path, device: str) -> dict:
    env = {**os.environ, "GPU_CHECK_MODEL": model_at_size(work), "GPU_CHECK_DEVICE": device}
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-s", "-p", "no:cacheprovider", "lorasum_assets_tests/test_gpu_qlora.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line.strip(".") for line in done.stdout.splitlines() if ": precision " in line or ": batched vs single" in line]
    summary = next((line for line in reversed(done.stdout.splitlines()) if " passed" in line or " failed" in line), "no pytest summary")
    if done.returncode != 0:
        raise SystemExit(f"qlora-3b: pytest exit {done.returncode}: {summary}\n{done.stdout[-4000:]}")
    return {"model": env["GPU_CHECK_MODEL"], "pytest": summary, "runs": lines}


def step_peer(work: Path, device: str) -> dict:
    import importlib.util

    variants = ["train-ours", "generate-ours", "generate-plain-bf16", "generate-plain-bf16-static-cache"]
    if importlib.util.find_spec("trl") is not None:
        variants.insert(1, "train-trl")
    output = Path(os.environ["GPU_CHECK_OUT"]) / f"peer-{device}.json"  # its own file: never the CPU's peer.json
    done = subprocess.run([sys.executable, "-m", "benchmarks.peer", "--device", device, "--model", model_at_size(work), "--quantization", "nf4",
                           "--sample", "--train", "16", "--generate", "12", "--repeats", "2" if device == "cuda" else "1",
                           "--variants", ",".join(variants), "--cache", str(work / "models"), "--output", str(output)],
                          cwd=ROOT, capture_output=True, text=True)
    table = [line for line in done.stdout.splitlines() if line.startswith("|") or line.startswith(("device", "cpu:"))]
    if done.returncode != 0:
        raise SystemExit(f"peer: exit {done.returncode}\n{(done.stdout + done.stderr)[-3000:]}")
    return {"variants": variants, "results": str(output), "table": table}


def run_step(name: str, work: Path, device: str) -> dict:
    model = "builtin:tiny-llama-3.2-bnb-4bit"
    if name == "env":
        return step_env(work, device)
    if name == "standin-bf16":
        return step_graph(work, device, name, model, "bf16")
    if name == "standin-fp16":
        return step_graph(work, device, name, model, "fp16", compute_dtype="float16")
    if name == "build-3b":
        return step_build(work, device)
    if name == "recipe-3b":
        return step_graph(work, device, name, model_at_size(work), "auto", short=True)
    if name == "qlora-3b":
        return step_qlora(work, device)
    if name == "peer":
        return step_peer(work, device)
    raise ValueError(f"unknown step {name!r}")


# ---- the runner


def run_limited(name: str, limit: int, work: Path, device: str) -> dict:
    """One step in a process group of its own, killed whole at its limit."""
    log = work / f"{name}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--step", name, "--work", str(work), "--device", device],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = 124
    seconds = round(time.perf_counter() - started, 1)
    record_file = work / f"{name}.json"
    record = json.loads(record_file.read_text()) if record_file.exists() and code == 0 else {}
    tail = log.read_text(errors="replace")[-1500:] if code != 0 else ""
    return {"exit": code, "seconds": seconds, "limit": limit, "timed_out": code == 124, "record": record, "log_tail": tail}


def summary_table(steps: dict) -> str:
    lines = ["| step | exit | seconds (limit) | what ran |", "|---|---|---|---|"]
    for name, step in steps.items():
        lines.append(f"| {name} | {step['exit']}{' (timed out)' if step['timed_out'] else ''} | {step['seconds']} ({step['limit']}) | "
                     f"{describe(name, step['record'])} |")
    return "\n".join(lines)


def peak(record: dict) -> str:
    return f", peak {record['peak_gpu_memory_gib']} GiB" if record.get("peak_gpu_memory_gib") is not None else ""


def describe(name: str, record: dict) -> str:
    if not record:
        return ""
    if "skipped" in record:
        return f"skipped: {record['skipped']}"
    if name == "env":
        return ", ".join(f"{k} {record.get(k)}" for k in ("gpu", "memory_gib", "capability", "driver", "cuda", "torch", "bitsandbytes",
                                                           "transformers", "peft") if record.get(k) is not None)
    if name == "build-3b":
        return f"{record['shape']}, {record['size_gb']} GB in {record['seconds']} s"
    if name == "qlora-3b":
        return f"{record['pytest']} on {record['model']}"
    if name == "peer":
        return f"{len(record['table'])} table lines, results in {record['results']}"
    parts = []
    training = record.get("training") or {}
    if training:
        parts.append(f"trained {training.get('quantization')} / compute {training.get('compute_dtype')} / {training.get('precision')}, "
                     f"{training.get('optimizer_steps')} steps at {training.get('steps_per_s')} steps/s, skipped {training.get('skipped_steps')}"
                     + peak(training))
    for asset in ("base_predictions", "tuned_predictions"):
        generated = record.get(asset) or {}
        if generated:
            parts.append(f"{asset.split('_')[0]}: {generated.get('engine')} {generated.get('engine_dtype')} on {generated.get('device')}, "
                         f"{generated.get('new_tokens_per_s')} new tokens/s" + peak(generated))
    parts.extend(record.get("export") or [])
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=os.environ.get("GPU_CHECK_DEVICE", "cuda"), choices=("cuda", "cpu"))
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", str(ROOT / "benchmarks" / "results" / "gpu_check")))
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        record = run_step(args.step, Path(args.work), args.device)
        (Path(args.work) / f"{args.step}.json").write_text(json.dumps(record, indent=2, default=str))
        print(json.dumps(record, indent=2, default=str))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    scale = 1 if args.device == "cuda" else LIMIT_SCALE_CPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    (work / "models").mkdir()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LORASUM_HOME=str(work / "home"), GPU_CHECK_OUT=str(out))
    print(f"gpu_check on {args.device}: {len(LIMITS)} steps, limits adding up to {sum(LIMITS.values()) * scale} s; work in {work}", flush=True)
    steps = {}
    for name, limit in LIMITS.items():
        steps[name] = run_limited(name, limit * scale, work, args.device)
        step = steps[name]
        print(f"{name}: exit {step['exit']}{' (timed out)' if step['timed_out'] else ''} in {step['seconds']} s "
              f"(limit {step['limit']} s) {describe(name, step['record'])}", flush=True)
        if step["exit"] != 0:
            print(re.sub(r"^", "    ", step["log_tail"], flags=re.M), flush=True)
    table = summary_table(steps)
    peer_table = "\n".join(steps["peer"]["record"].get("table", []))
    text = f"{table}\n\npeer (benchmarks.peer, QLoRA on the real-size model):\n{peer_table}\n" if peer_table else table + "\n"
    (out / "summary.json").write_text(json.dumps({"device": args.device, "steps": steps}, indent=2, default=str))
    (out / "summary.md").write_text(text)
    print("\n" + text)
    failed = [name for name, step in steps.items() if step["exit"] != 0]
    print(f"steps: {len(steps) - len(failed)} of {len(steps)} passed" + (f"; failed: {', '.join(failed)}" if failed else "")
          + f"; wrote {out / 'summary.json'} and {out / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
