"""Subcommands by method family. Each module defines ``add_commands(sub)``, which
adds its argparse subparsers, and registers its handlers with
``deepshrink.cli.command``; ``deepshrink.cli`` discovers the modules here."""
