"""Regenerate docs/cli.md from the click commands: ``make cli-docs``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tca.cli import main

ROOT = Path(__file__).resolve().parent.parent
"""The checkout: defaults inside it (the shipped demo pair) are shown relative to it, so the page
does not depend on where it was generated."""


def render(cmd: click.Command, path: list[str], out: list[str]) -> None:
    ctx = click.Context(cmd, info_name=" ".join(path))
    out += [f"## `{' '.join(path)}`", "", "```text", cmd.get_help(ctx).replace(f"{ROOT}/", ""), "```", ""]
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            render(cmd.commands[name], path + [name], out)


if __name__ == "__main__":
    lines = [
        "# CLI reference",
        "",
        "Every command prints results to stdout and logs and progress to stderr; `--help` on any",
        "command prints the same text as below. Bad input exits with status 2 and one sentence.",
        "",
    ]
    render(main, ["tca"], lines)
    sys.stdout.write("\n".join(lines))
