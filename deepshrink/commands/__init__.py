"""Subcommands by method family, one module each. Every module defines
``add_commands(sub)``, which adds its argparse subparsers, and registers its
handlers with ``command``; ``deepshrink.cli`` assembles the parser from
``FAMILIES`` and dispatches through ``COMMANDS``. Shared flags and helpers are
the public functions of ``deepshrink.commands.args``."""

import argparse
from collections.abc import Callable

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}

# the modules that add subcommands, in the order ``deepshrink --help`` lists them
FAMILIES = ("zoo", "evaluate", "compress", "prune", "auto", "distill", "onnx", "quantize", "study", "transformers")


def command(name: str):
    """Register ``func`` as the handler of subcommand ``name``."""

    def add(func):
        COMMANDS[name] = func
        return func

    return add
