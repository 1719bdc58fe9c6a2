"""The user documentation stays true to the code."""

from __future__ import annotations

from pathlib import Path

import click

from tca.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _commands(group: click.Group, prefix: str = "tca"):
    for name, cmd in group.commands.items():
        yield f"{prefix} {name}", cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix} {name}")


def test_cli_reference_documents_every_command_and_option():
    text = (DOCS / "cli.md").read_text()
    for path, cmd in _commands(main):
        assert f"## `{path}`" in text, f"docs/cli.md lacks {path}; run make cli-docs"
        for param in cmd.params:
            if getattr(param, "hidden", False):
                continue  # former flag names: they work, with a deprecation line, but are not advertised
            for opt in getattr(param, "opts", []):
                if opt.startswith("--"):
                    assert opt in text, f"docs/cli.md lacks {path} {opt}"


def test_docs_index_links_resolve():
    index = (DOCS / "index.md").read_text()
    for page in ("store.md", "train.md", "kernels.md", "query.md", "cli.md", "scale.md"):
        if f"({page})" in index:
            assert (DOCS / page).exists(), page
