"""Benchmark scripts, also run as `attncache bench precompute|precompute-profile|compression|train|students|students-plot`."""
import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default, help text or not."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text.strip()
