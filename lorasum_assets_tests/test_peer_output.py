"""benchmarks.peer on a GPU: its results go to a file of their own, and "ours" is named for what ran."""

from benchmarks.common import RESULTS
from benchmarks.peer import ours_label, results_file


def test_a_gpu_run_never_overwrites_the_cpu_results():
    assert results_file(None, "cpu") == RESULTS / "peer.json"
    assert results_file(None, "cuda") == RESULTS / "peer-cuda.json"
    assert results_file(None, "cuda:1") == RESULTS / "peer-cuda.json"
    assert results_file("/tmp/check/peer-cuda.json", "cuda").as_posix() == "/tmp/check/peer-cuda.json"


def test_ours_is_named_for_the_engine_that_generated():
    assert ours_label([{"engine": "lorasum"}]) == "ours"
    # on a GPU or a 4-bit model our decoder cannot run: transformers' generate did, and is not called ours
    assert ours_label([{"engine": "transformers"}]) == "our batching around transformers' generate"
