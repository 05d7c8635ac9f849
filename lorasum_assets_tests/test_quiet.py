"""The libraries' known noise is hidden by default and shown again with LORASUM_VERBOSE=1."""

import os
import subprocess
import sys

NOISY = """
import lorasum_assets
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


def test_lorasum_verbose_shows_it_again():
    stderr = stderr_of("1")
    assert [noise for noise in NOISE if noise in stderr] == list(NOISE), stderr
