"""docs/sae.md: its Python examples run in order and print what the page says (the hub
examples against folders built in the published layouts, no network); its shell commands run
through the CLI as written; the options it lists exist; its measured figures are the
benchmark's."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "sae.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def _expected_prints(block: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+#\s?(.*)$", block, re.M)]


def sae_cli():
    """diffprobe's CLI with the ``sae`` group registered (cli.py registers it once merged)."""
    from diffprobe import cli

    if not any(group.name == "sae" for group in cli.app.registered_groups):
        from diffprobe.sae.cli import register

        register(cli.app)
    return cli


def _published_layouts(root: Path) -> Path:
    """A SAeUron hub snapshot (sparsify layout) and an sdxl-unbox checkpoint folder."""
    g = torch.Generator().manual_seed(0)
    hub = root / "hub-snapshot"
    folder = hub / "unet.up_blocks.1.attentions.1"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(
        {"expansion_factor": 4, "normalize_decoder": True, "num_latents": 0, "k": 4,
         "batch_topk": True, "sample_topk": False, "input_unit_norm": False, "d_in": 16}))  # fmt: skip
    save_file({"encoder.weight": torch.randn(64, 16, generator=g), "encoder.bias": torch.zeros(64),
               "W_dec": torch.randn(64, 16, generator=g), "b_dec": torch.zeros(16)},
              folder / "sae.safetensors")  # fmt: skip
    unbox = (root / "sdxl-unbox" / "checkpoints" /
             "unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001" / "final")  # fmt: skip
    unbox.mkdir(parents=True)
    (unbox / "config.json").write_text(json.dumps(
        {"n_dirs_local": 64, "d_model": 16, "k": 10, "auxk": 32, "dead_steps_threshold": 100}))  # fmt: skip
    torch.save({"state_dict": {"pre_bias": torch.zeros(16), "latent_bias": torch.zeros(64),
                               "encoder.weight": torch.randn(64, 16, generator=g),
                               "decoder.weight": torch.randn(16, 64, generator=g)}},
               unbox / "state_dict.pth")  # fmt: skip
    torch.save(torch.rand(64), unbox / "mean.pt")
    torch.save(torch.rand(64), unbox / "std.pt")
    return hub


def test_python_examples_run_and_print_what_they_say(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    hub = _published_layouts(tmp_path)
    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **_):
        asked.append((repo_id, allow_patterns))
        return str(hub)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    blocks = _blocks("python")
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            exec(compile(block, str(DOC), "exec"), namespace)
        for text in _expected_prints(block):
            assert text in captured.getvalue(), (
                f"the page says {text!r}; got {captured.getvalue()!r}"
            )
    assert asked == [("bcywinski/SAeUron", "unet.up_blocks.1.attentions.1/*")]


def _commands(language: str = "bash") -> list[list[str]]:
    commands = []
    for block in _blocks(language):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("diffprobe "):
                commands.append(shlex.split(line)[1:])
    return commands


@pytest.mark.slow
def test_shell_commands_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = sae_cli()
    commands = _commands()
    assert [c[:2] for c in commands] == [["extract", "--model"], ["sae", "train"],
                                         ["sae", "eval"], ["sae", "info"]]  # fmt: skip
    for args in commands:
        cli.main(args)
    out = capsys.readouterr().out
    assert re.search(r"tokens 8192 +FVU 0\.\d+ +L0 8\.00 +dead fraction 0\.\d+", out)
    assert re.search(r"^p0\.2 +4096 ", out, re.M) and re.search(r"^p0\.6 +4096 ", out, re.M)
    assert "layout: saelens" in out and "metadata.site: unet.up_blocks.1" in out
    assert "metadata.model_name: tiny" in out


def test_the_options_the_page_lists_exist():
    import typer

    cli = sae_cli()
    group = typer.main.get_command(cli.app).commands["sae"]
    train = {o for p in group.commands["train"].params for o in p.opts + p.secondary_opts}
    listed = DOC.read_text().split("`sae train` takes", 1)[1].split("The SAE's", 1)[0]
    for option in re.findall(r"`(--[a-z-]+)", listed):
        for name in option.split("/"):
            assert name in train, f"docs/sae.md lists {name}, which `sae train` does not take"
    for args in _commands() + _commands("sh"):  # sh: generation commands, not run here
        if args[0] == "sae":
            known = {o for p in group.commands[args[1]].params for o in p.opts}
            assert {a for a in args if a.startswith("--")} <= known | {"--quiet"}


def test_the_measured_throughput_is_the_benchmarks():
    result = json.loads((ROOT / "benchmarks" / "results" / "sae-train-cpu.json").read_text())
    text = DOC.read_text()
    assert "BENCH_" not in text
    for case, label in (("auxk_idle", "AuxK idle"), ("auxk_half_dead", "half the latents dead")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
        speeds = result["cases"][case]["tokens_per_second"]
        assert f"{speeds['diffprobe']:,.0f}" in row and f"{speeds['sparsify']:,.0f}" in row
        assert f"{result['cases'][case]['ratio']:.2f}x" in row
