"""The libraries' known noise is hidden where a process starts (the code location, the CLI), by
default, and shown again with LORASUM_VERBOSE=1; importing the package itself changes nothing."""

import os
import subprocess
import sys

NOISY = """
import lorasum_assets.definitions  # the code location: where every Dagster process starts
import bitsandbytes  # notes on CPU that the optional 'kernels' package is missing
import dagster as dg
import transformers
dg.Output(1, data_version=dg.DataVersion("v1"))  # a beta parameter
config = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2)
transformers.LlamaForCausalLM(config).is_gradient_checkpointing  # what PEFT reads
# The same sources in words no release has used yet: the filters go by source, not by wording.
import logging
logging.getLogger("kernels.layer").warning("reworded notice from kernels")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("reworded notice from bitsandbytes")
"""
NOISE = ("kernels-community", "BetaWarning", "is_gradient_checkpointing", "reworded notice from kernels",
         "reworded notice from bitsandbytes")


def stderr_of(verbose: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LORASUM_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    if verbose is not None:
        env["LORASUM_VERBOSE"] = verbose
    done = subprocess.run([sys.executable, "-W", "default", "-c", NOISY], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_known_library_noise_is_hidden_by_default():
    stderr = stderr_of(None)
    assert not [noise for noise in NOISE if noise in stderr], stderr


def bitsandbytes_notices_here() -> bool:
    """Whether importing bitsandbytes on this machine asks for hub kernels (it does on CPUs whose
    kernels the hub has, e.g. with AVX512-BF16), and so prints the notice."""
    done = subprocess.run([sys.executable, "-W", "default", "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=300)
    return "kernels-community" in done.stderr


def test_lorasum_verbose_shows_it_again():
    stderr = stderr_of("1")
    expected = [noise for noise in NOISE if noise != "kernels-community" or bitsandbytes_notices_here()]
    assert [noise for noise in NOISE if noise in stderr] == expected, stderr


IMPORT_ONLY = """
import logging, warnings
import duckdb, numpy, pyarrow, safetensors, tqdm  # what these modules import: their own filters come first
before = (list(warnings.filters), logging.getLogger("kernels").level, logging.getLogger("bitsandbytes").level)
import lorasum_assets, lorasum_assets.store.lake, lorasum_assets.tools.cli, lorasum_assets.ml.training.records
after = (list(warnings.filters), logging.getLogger("kernels").level, logging.getLogger("bitsandbytes").level)
print(before == after, len(after[0]) - len(before[0]))
"""


def test_importing_the_package_installs_no_warning_filter():
    done = subprocess.run([sys.executable, "-c", IMPORT_ONLY], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "0"]
