"""benchmarks/gpu_check.sh stays runnable where no GPU is: its CPU dry run reaches every step and
writes the summary, and each step records what ran."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["env", "standin-bf16", "standin-fp16", "build-3b", "recipe-3b", "qlora-3b", "peer"]


@pytest.mark.slow
def test_the_gpu_check_dry_run_on_the_cpu_reaches_every_step_and_writes_its_summary(tmp_path):
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    print(done.stdout[-6000:])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    steps = summary["steps"]
    assert list(steps) == STEPS and all(step["exit"] == 0 and step["seconds"] < step["limit"] for step in steps.values())
    assert "steps: 7 of 7 passed" in done.stdout and (tmp_path / "out" / "summary.md").read_text().startswith("| step | exit |")
    # what ran, as the runs recorded it: the recipe's 4-bit base, in the precision and compute dtype each step asked for
    recorded = {name: (steps[name]["record"]["training"]["quantization"], steps[name]["record"]["training"]["compute_dtype"],
                       steps[name]["record"]["training"]["precision"]) for name in ("standin-bf16", "standin-fp16")}
    assert recorded == {"standin-bf16": ("nf4", "bfloat16", "bf16"), "standin-fp16": ("nf4", "float16", "fp16")}
    assert all("(bfloat16, on cpu)" in steps[name]["record"]["export"][0] for name in ("standin-bf16", "recipe-3b"))
    assert steps["recipe-3b"]["record"]["training"]["optimizer_steps"] == 4  # 16 dialogues, batch 1 x accumulation 4, 1 epoch
    assert steps["qlora-3b"]["record"]["pytest"].startswith("6 passed")
    assert (tmp_path / "out" / "peer-cpu.json").exists()
