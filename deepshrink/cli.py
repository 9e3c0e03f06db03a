"""The ``deepshrink`` command: assembles the parser from ``deepshrink.commands``
and runs the chosen subcommand. Errors print as one line and exit with status 2."""

import argparse
import importlib
import sys

from deepshrink.commands import COMMANDS, FAMILIES
from deepshrink.core.errors import DeepShrinkError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepshrink", description="Compress neural networks and measure the result.")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        importlib.import_module(f"deepshrink.commands.{family}").add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DeepShrinkError as exc:
        print(f"deepshrink: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepshrink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
