"""The `vgg-flax` command and the training program's entry point (argument parsing only)."""

from vgg_flax.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
