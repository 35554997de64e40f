"""The README's and the docs' python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = ["README.md", "docs/noise.md", "docs/tiny.md", "docs/dream.md", "docs/attribution.md"]


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.DOTALL)


# the pages whose examples take seconds (they load `tiny` and generate) run in `make test` only
SLOW_PAGES = {"README.md", "docs/tiny.md", "docs/dream.md", "docs/attribution.md"}


@pytest.mark.parametrize(
    "page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in PAGES]
)
def test_python_examples_run(page):
    blocks = _blocks(page)
    assert blocks, f"{page} has no python example"
    for block in blocks:
        exec(compile(block, f"{page} example", "exec"), {"__name__": "__doc_example__"})


def test_readme_quick_start_is_the_two_make_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = [line.split("#")[0].strip() for line in re.findall(r"```sh\n(.*?)```", quick,
                flags=re.DOTALL)[0].splitlines() if line.strip()]  # fmt: skip
    assert commands == ["make demo", "make test"]


def _readme_commands() -> list[list[str]]:
    import shlex

    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith((".venv/bin/diffprobe ", "diffprobe ")):
                found.append(shlex.split(line)[1:])
    return found


def test_readme_lists_every_command_and_each_parses():
    """Every `diffprobe COMMAND` line of the README names a real command whose options exist
    and convert (click parses it without running it), and every command is in the README."""
    import typer

    from diffprobe.cli import app, join_variadic

    group = typer.main.get_command(app)
    written = _readme_commands()
    assert {argv[0] for argv in written if not argv[0].startswith("-")} == set(group.commands)
    for argv in written:
        if argv[0].startswith("-"):
            assert argv == ["--version"]
            continue
        command, rest = group.commands[argv[0]], argv[1:]
        if hasattr(command, "commands"):  # a group of commands: diffprobe sae train ...
            command, rest = command.commands[rest[0]], rest[1:]
        context = command.make_context(argv[0], join_variadic(rest))
        assert context.params, argv
