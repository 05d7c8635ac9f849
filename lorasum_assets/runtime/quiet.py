"""Known noise of the libraries, filtered where it arises: each filter says why what it hides is
safe to hide. ``LORASUM_VERBOSE=1`` (or the CLI's ``-v``) shows it all again.

Installed when the package is imported, so before any of these libraries is: every ``dagster``
command, code server and run worker imports ``lorasum_assets`` first.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from lorasum_assets.settings.env import VERBOSE_ENV, get_env

_PROGRESS_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"  # huggingface_hub's, which transformers' bars follow

# (message regex, category, why it is safe to hide). Dagster's BetaWarning is matched as a plain
# Warning so that importing the package does not import dagster.
KNOWN_WARNINGS = (
    (r"Parameter `data_version` of initializer `Output.__init__` is currently in beta", Warning,
     "dagster is pinned to one minor version (pyproject.toml), so the beta API we call cannot change under us"),
    (r"Function `PipesMessageReader.expected_writer_count` is currently in preview", Warning,
     "the same pin: Dagster Pipes counts the accelerate worker's writers with it"),
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning,
     "PEFT reads transformers' deprecated alias, which returns what is_activation_checkpointing does"),
)


class _KernelsNotice(logging.Filter):
    """bitsandbytes on CPU tries the ``kernels`` package, which would download kernels from the
    hub, and falls back to its own NF4 code when it is missing: the notice says only that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


_kernels_notice = _KernelsNotice()
_installed: list[tuple] = []


def verbose_requested() -> bool:
    return (get_env(VERBOSE_ENV) or "0").lower() not in ("0", "false", "no")


def quiet_known_noise() -> None:
    """Hide the warnings above and the weight loading and saving bars (the run log says what loaded
    and how long it took), unless ``LORASUM_VERBOSE`` asks for them."""
    if verbose_requested() or _installed:
        return
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_kernels_notice)
    for message, category, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
        _installed.append(warnings.filters[0])
    if _PROGRESS_BARS_ENV not in os.environ:
        os.environ[_PROGRESS_BARS_ENV] = "1"
        _installed.append(("env", _PROGRESS_BARS_ENV))
    _set_library_bars(enabled=False)


def show_known_noise() -> None:
    """Undo ``quiet_known_noise`` (the CLI's ``-v``)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").removeFilter(_kernels_notice)
    for entry in _installed:
        if entry[0] == "env":
            os.environ.pop(entry[1], None)
        elif entry in warnings.filters:
            warnings.filters.remove(entry)
    _installed.clear()
    _set_library_bars(enabled=True)


def _set_library_bars(enabled: bool) -> None:
    """The bars' switches of libraries already imported; those imported later read the variable."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if enabled else disable_progress_bars)()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
