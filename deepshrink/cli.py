"""The ``deepshrink`` command: assembles the parser from ``deepshrink.commands``
and runs the chosen subcommand. Errors print as one line and exit with status 2."""

import argparse
import importlib
import sys

from deepshrink.commands import COMMANDS, FAMILIES
from deepshrink.commands.args import add_device_args
from deepshrink.core.errors import DeepShrinkError

# Commands that train or calibrate: each takes --device and, under torchrun, --dist-backend.
DEVICE_COMMANDS = ("train", "compress", "prune", "distill", "decompose", "quantize", "auto", "transformer", "study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepshrink", description="Compress neural networks and measure the result.")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        importlib.import_module(f"deepshrink.commands.{family}").add_commands(sub)
    for name in DEVICE_COMMANDS:
        add_device_args(sub.choices[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    from deepshrink.distributed import command_context, world_from_env

    args = build_parser().parse_args(argv)
    try:
        with command_context(args):  # --device, torchrun's process group; only rank 0 writes
            return COMMANDS[args.command](args)
    except DeepShrinkError as exc:
        if world_from_env().is_main:  # under torchrun every rank fails alike: one line, not N
            print(f"deepshrink: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepshrink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
