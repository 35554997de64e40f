"""docs/store.md: its Python examples run (in order, as one script) and print what the page says;
the CLI options its shell examples use exist."""

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).parents[1] / "docs" / "store.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def _expected_prints(block: str) -> list[str]:
    """Comments that state what a print shows: trailing a print line, or on the line after one."""
    expected, lines = [], block.splitlines()
    for index, line in enumerate(lines):
        if not line.lstrip().startswith("print("):
            continue
        match = re.search(r"\)\s+#\s?(.*)$", line)
        if match:
            expected.append(match.group(1).strip())
        elif index + 1 < len(lines) and lines[index + 1].lstrip().startswith("#"):
            expected.append(lines[index + 1].lstrip()[1:].strip())
    return expected


@pytest.mark.slow
def test_python_examples_run_and_print_what_they_say(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            exec(compile(block, str(DOC), "exec"), namespace)
        for text in _expected_prints(block):
            assert text in captured.getvalue(), (
                f"the page says {text!r}; printed {captured.getvalue()!r}"
            )
    # the run the page builds has the documented layout on disk
    root = tmp_path / "runs" / "store-demo"
    assert sorted(p.name for p in root.iterdir()) == [
        "diffprobe-output.json",
        "features.zarr",
        "progress",
        "run.json",
    ]
    assert (
        root / "features.zarr" / "unet.down_blocks.1~hidden_states" / "cap.cond" / "p0.1"
    ).is_dir()


def _extract_command():
    import typer

    from diffprobe.cli import app

    return typer.main.get_command(app).commands["extract"]


# what the shell would put in place of the variables the examples use
_VARIABLES = {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "4", "SLURM_ARRAY_TASK_ID": "5",
              "N": "8"}  # fmt: skip


def _documented_extract_commands() -> list[list[str]]:
    import shlex

    commands = []
    for block in _blocks("bash"):
        text = block.replace("\\\n", " ")
        text = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: _VARIABLES[m.group(1)], text)
        for command in re.findall(r"diffprobe extract([^'\n]*)", text):
            commands.append(shlex.split(command))
    return commands


def test_shell_examples_parse_as_extract_commands():
    """Each documented `diffprobe extract` line parses with the real CLI (options exist, values
    convert, no stray arguments) and shards as the page says."""
    command = _extract_command()
    documented = _documented_extract_commands()
    assert len(documented) >= 2
    for argv in documented:
        context = command.make_context("extract", list(argv))
        # the sharding examples, and the single-process reference of the torchrun comparison
        assert context.params["shard"] in ("1/4", "5/8") or "--threads" in argv, argv
        assert context.params["sites"] in (["unet.mid_block unet.up_blocks.1"], ["unet.mid_block"])


def test_embedded_python_script_compiles():
    scripts = [m for b in _blocks("bash") for m in re.findall(r"<<'EOF'\n(.*?)\nEOF", b, re.DOTALL)]
    assert scripts
    for script in scripts:
        compile(script, "extract_shard.py", "exec")
