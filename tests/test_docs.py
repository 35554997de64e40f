"""The README's and the docs' python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = ["README.md", "docs/noise.md", "docs/tiny.md"]


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES)
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
