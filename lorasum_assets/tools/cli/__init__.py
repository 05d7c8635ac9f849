"""The ``lorasum`` command: the evaluation history, run comparisons, summaries, adapters and exports.

``main`` parses, runs one command and maps errors to exit codes (1: a message, 3: the history
stayed busy). Each family of commands lives in its own module and adds its subcommands to the
parser: ``history`` (reads), ``summarize``, ``adapters`` (promote, rollback, export-model) and
``operations`` (sweep, recover, init-instance); ``output`` is what they share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from lorasum_assets.runtime.quiet import quiet_known_noise
from lorasum_assets.store.transactions import DatabaseBusyError
from lorasum_assets.tools.cli import adapters, history, operations, summarize

FAMILIES = (history, summarize, adapters, operations)


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once: not when the help already says it, nor for flags and unset options."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    formatter = _DefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="lorasum", description="Query the lorasum evaluation history (a DuckLake: LORASUM_HISTORY, default under LORASUM_HOME).", formatter_class=formatter
    )
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--json", action="store_true", help="machine-readable output (errors too)")
    shared.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own progress bars and warnings")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, func, common: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[shared] if common else [], help=help_text, description=help_text, formatter_class=formatter)
        p.set_defaults(func=func)
        return p

    for family in FAMILIES:
        family.register(command)
    return parser


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """One line on stderr, or a JSON object on stdout under --json."""
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": code}))
    else:
        print(message if message.startswith("lorasum") else f"lorasum: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    quiet_known_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DatabaseBusyError as exc:
        return _fail(args, str(exc), 3)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            return _fail(args, exc.code, 1)
        raise
    except BrokenPipeError:
        # The reader went away (`lorasum report --json | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
