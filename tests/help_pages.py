"""Every `--help` page of the `attncache` command line, found by walking the click group.

Used by tests/test_cli_help.py (issue 16 item 6): each page is rendered in a fresh interpreter, so
the test sees which modules rendering it imported, and the pages are compared with the pinned ones
of tests/data/cli_help_pages.json (written by `python tests/help_pages.py --write` before the
commands' heavy imports moved into their bodies). The default of `--threads` depends on the
machine's CPU count, so it is pinned as a placeholder.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

PIN = Path(__file__).parent / "data" / "cli_help_pages.json"
THREADS = "{THREADS}"

# run in a fresh interpreter: print the page of argv[1:] (JSON list) and then the heavy modules it loaded
_RENDER = r"""
import json, sys
argv = json.loads(sys.argv[1])
from attncache.cli.main import cli
try:
    cli.main(args=[*argv, "--help"], prog_name="attncache", standalone_mode=False)
except SystemExit:
    pass
sys.stdout.flush()
heavy = sorted(m for m in ("torch", "timm", "ray", "zarr", "torchvision", "webdataset", "matplotlib") if m in sys.modules)
sys.stderr.write("\nHEAVY=" + json.dumps(heavy) + "\n")
"""


def command_paths() -> list[list[str]]:
    """[] for the group itself, then every command and sub-command, depth first, in listed order."""
    import click

    from attncache.cli.main import cli

    paths: list[list[str]] = []

    def walk(command: click.Command, path: list[str]) -> None:
        paths.append(path)
        if isinstance(command, click.Group):
            ctx = click.Context(command)
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), [*path, name])

    walk(cli, [])
    return paths


def render(path: list[str]) -> tuple[str, list[str]]:
    """(the help page of `attncache PATH --help`, the heavy modules its process imported)."""
    env = {**os.environ, "COLUMNS": "80"}
    result = subprocess.run([sys.executable, "-c", _RENDER, json.dumps(path)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    heavy = json.loads(result.stderr.rsplit("HEAVY=", 1)[1])
    return result.stdout, heavy


def pinned_form(page: str) -> str:
    """The page with the machine-dependent `--threads` default (a CPU count) replaced by a placeholder."""
    blocks: list[list[str]] = []  # one per option (its first line starts with a dash), wrapped lines with it
    for line in page.split("\n"):
        if line.strip().startswith("-") or not blocks:
            blocks.append([])
        blocks[-1].append(line)
    texts = ["\n".join(b) for b in blocks]
    texts = [re.sub(r"default:(\s*)\d+\b", rf"default:\g<1>{THREADS}", t) if t.strip().startswith("--threads ")
             else t for t in texts]
    return "\n".join(texts)


def main() -> None:
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/help_pages.py --write")
    pages = {" ".join(path): pinned_form(render(path)[0]) for path in command_paths()}
    PIN.write_text(json.dumps(pages, indent=1, sort_keys=True) + "\n")
    print(f"{len(pages)} pages -> {PIN}")


if __name__ == "__main__":
    main()
