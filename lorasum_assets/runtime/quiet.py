"""Known noise of the libraries, filtered by where it comes from (a logger's name, a warning's
category or module), never by its wording: a notice reworded in a new release stays hidden.
Each filter says why what it hides is safe to hide. ``LORASUM_VERBOSE=1`` (or the CLI's ``-v``)
shows it all again.

Installed where a process starts, before these libraries are imported: the code location
(``definitions.py``, which every ``dagster`` command, code server and run worker loads first), the
``lorasum`` CLI and the accelerate worker. Importing the package installs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

from lorasum_assets.settings.env import VERBOSE_ENV, get_env

_PROGRESS_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"  # huggingface_hub's, which transformers' bars follow

# (logger name, why its warnings are safe to hide). Errors still show.
QUIET_LOGGERS = (
    ("kernels",
     "transformers pulls in the `kernels` package, which bitsandbytes asks for hub-hosted CPU kernels; offline "
     "(HF_HUB_OFFLINE=1) it can only say that it is skipping the hub"),
    ("bitsandbytes",
     "on CPU bitsandbytes falls back to its own NF4 code when the hub kernels are not there, and says so; what "
     "loaded (4-bit or not, compute dtype) is recorded from the model itself"),
)

# (warning category, module regex or "", why it is safe to hide). Dagster's categories are named
# by their module and class so that importing this package does not import dagster.
QUIET_WARNINGS = (
    ("dagster_shared.utils.warnings.BetaWarning", "",
     "dagster is pinned to one minor version (pyproject.toml, requirements.lock), so the beta APIs we call cannot change under us"),
    ("dagster_shared.utils.warnings.PreviewWarning", "",
     "the same pin: Dagster Pipes counts the accelerate worker's writers with a preview API"),
    ("builtins.FutureWarning", r"transformers\.modeling_utils",
     "PEFT reads transformers' deprecated alias is_gradient_checkpointing, which returns what is_activation_checkpointing does"),
)

_installed: list[tuple] = []


def verbose_requested() -> bool:
    return (get_env(VERBOSE_ENV) or "0").lower() not in ("0", "false", "no")


def quiet_known_noise() -> None:
    """Hide the loggers and warnings above and the weight loading and saving bars (the run log says
    what loaded and how long it took), unless ``LORASUM_VERBOSE`` asks for them."""
    if verbose_requested() or _installed:
        return
    for name, _why in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        _installed.append(("logger", name, logger.level))
        logger.setLevel(logging.ERROR)
    for category_path, module, _why in QUIET_WARNINGS:
        category = _warning_category(category_path)
        if category is None:
            continue
        warnings.filterwarnings("ignore", category=category, module=module)
        _installed.append(warnings.filters[0])
    if _PROGRESS_BARS_ENV not in os.environ:
        os.environ[_PROGRESS_BARS_ENV] = "1"
        _installed.append(("env", _PROGRESS_BARS_ENV))
    _set_library_bars(enabled=False)


def show_known_noise() -> None:
    """Undo ``quiet_known_noise`` (the CLI's ``-v``)."""
    for entry in _installed:
        if entry[0] == "env":
            os.environ.pop(entry[1], None)
        elif entry[0] == "logger":
            logging.getLogger(entry[1]).setLevel(entry[2])
        elif entry in warnings.filters:
            warnings.filters.remove(entry)
    _installed.clear()
    _set_library_bars(enabled=True)


def _warning_category(path: str) -> type[Warning] | None:
    """The class a dotted path names; dagster_shared is a few small modules, not dagster itself."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = sys.modules.get(module_name) or __import__(module_name, fromlist=[class_name])
    except ImportError:
        return None
    return getattr(module, class_name, None)


def _set_library_bars(enabled: bool) -> None:
    """The bars' switches of libraries already imported; those imported later read the variable."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if enabled else disable_progress_bars)()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()


@contextlib.contextmanager
def quiet_libraries(verbose: bool):
    """Without -v, the libraries' progress bars, warnings and notices (bitsandbytes prints one at
    import) do not reach the terminal; errors still do, once the block has ended. Yields a stream
    to the terminal's stderr, for our own progress bars."""
    if verbose:
        show_known_noise()
        yield sys.stderr
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield terminal
    finally:
        terminal.close()
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
