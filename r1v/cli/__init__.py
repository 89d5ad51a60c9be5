"""The `r1v` command: every subcommand's parser and handler lives in this package (`main` dispatches)."""

from r1v.cli.app import main

__all__ = ["main"]
