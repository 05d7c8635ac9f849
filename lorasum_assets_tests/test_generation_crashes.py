"""Generation that is killed or runs out of memory: clean rematerialization, a halved batch."""

import json
import os
import signal
import subprocess
import sys
import time

import dagster as dg
import pytest

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets_tests.helpers import REPO, history_of


@pytest.mark.slow  # runs a real job, kills it mid-step and runs it again: 30-40 s
def test_a_killed_generation_step_rematerializes_cleanly(fresh_home, tmp_path):
    # base_predictions reads the filtered_split materialization recorded in the same Dagster instance
    (tmp_path / "dagster").mkdir()
    with dg.DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        assert dg.materialize(ALL_ASSETS, resources=build_resources(get_profile("tiny")), instance=instance,
                              selection="*filtered_split").success
    slow = tmp_path / "slow.yaml"
    slow.write_text(json.dumps({"ops": {"base_predictions": {"config": {"max_new_tokens": 400, "batch_size": 1}}}}))
    env = {**os.environ, "LORASUM_HOME": str(fresh_home), "LORASUM_PROFILE": "tiny", "DAGSTER_HOME": str(tmp_path / "dagster")}
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "lorasum_assets.definitions", "--select", "base_predictions"]
    proc = subprocess.Popen([*command, "-c", str(slow)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if "base_predictions: 2/12 summaries" in line or time.monotonic() > deadline:
            break
    assert proc.poll() is None, "generation finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    con = history_of(fresh_home)
    assert con.execute("SELECT count(*) FROM base_predictions").fetchone()[0] == 0  # nothing half-written
    con.close()

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    con = history_of(fresh_home)
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM base_predictions").fetchone() == (12, 12)


def test_generation_that_runs_out_of_cuda_memory_halves_its_batch_down_to_one(tiny_model, tiny_tokenizer, monkeypatch):
    import torch

    from lorasum_assets.ml.generation.generate import generate
    from lorasum_assets.settings.specs import GenerationSpec

    real_generate, sizes = tiny_model.generate, []

    def fits_two_at_most(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_generate(**kwargs)

    # model.generate is the path a CUDA model takes; on this CPU decoder auto would take lorasum
    monkeypatch.setattr(tiny_model, "generate", fits_two_at_most)
    prompts = [[1, 5 + i, 6, 7] for i in range(7)]
    spec = GenerationSpec(max_new_tokens=4, batch_size=8, decoder="transformers")
    said: list[str] = []
    halved = generate(tiny_model, tiny_tokenizer, prompts, spec, on_progress=said.append)
    print(f"batch sizes tried {sizes}; said {said}")
    assert sizes == [7, 4, 2, 2, 2, 1]
    assert said == ["CUDA ran out of memory generating 7 summaries at once; going on 4 at a time",
                    "CUDA ran out of memory generating 4 summaries at once; going on 2 at a time"]
    monkeypatch.setattr(tiny_model, "generate", real_generate)
    assert [g.text for g in halved] == [g.text for g in generate(tiny_model, tiny_tokenizer, prompts, spec)]

    def never_fits(**kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tiny_model, "generate", never_fits)
    with pytest.raises(RuntimeError, match=r"a single prompt: lower the generation batch_size \(now 4\) or max_new_tokens \(now 9\)"):
        generate(tiny_model, tiny_tokenizer, [[1, 5, 6], [1, 7, 8]], GenerationSpec(max_new_tokens=9, batch_size=4, decoder="transformers"))
