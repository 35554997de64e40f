"""``diffprobe sae train | eval | info`` through the console entry point: results on stdout,
expected failures as one line and exit code 2, output folders untouched by refused commands."""

from __future__ import annotations

import json

import numpy as np
import pytest


def sae_cli():
    from diffprobe import cli

    return cli


def _main(args: list[str]) -> int:
    try:
        sae_cli().main(args)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture()
def tokens(tmp_path):
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).standard_normal((2048, 12)).astype(np.float32))
    return path


def test_train_eval_info_on_a_npy_file(tmp_path, tokens, capsys):
    out = tmp_path / "sae"
    code = _main(["sae", "train", "--activations", str(tokens), "--site", "unet.mid_block",
                  "--out", str(out), "--expansion", "2", "--k", "4", "--batch-size", "256",
                  "--device", "cpu", "--site-semantics", "delta", "--quiet"])  # fmt: skip
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    assert _main(["sae", "eval", str(out), "--activations", str(tokens), "--json",
                  "--quiet"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 2048 and 0 < result["fvu"] < 1.5 and result["l0"] <= 4
    assert _main(["sae", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["layout"], info["d_in"], info["d_sae"], info["k"]) == ("saelens", 12, 24, 4)
    assert info["metadata"]["site"] == "unet.mid_block"
    assert info["metadata"]["site_semantics"] == "delta"


def test_expected_failures_are_one_line(tmp_path, tokens, capsys):
    out = tmp_path / "never"
    assert _main(["sae", "train", "--activations", str(tokens), "--run", str(tmp_path),
                  "--site", "s", "--out", str(out), "--quiet"]) == 2  # fmt: skip
    assert "either as --run RUN --site SITE or as --activations" in _error_line(capsys)
    assert _main(["sae", "train", "--activations", str(tokens), "--out", str(out), "--k", "400",
                  "--expansion", "2", "--batch-size", "256", "--quiet"]) == 2  # fmt: skip
    assert "k 400 is larger than d_sae 24" in _error_line(capsys)
    assert not out.exists()  # refused before the folder was made

    (tmp_path / "empty").mkdir()
    assert _main(["sae", "info", str(tmp_path / "empty")]) == 2
    assert "holds no SAE in a layout diffprobe reads" in _error_line(capsys)

    trained = tmp_path / "sae"
    _main(["sae", "train", "--activations", str(tokens), "--out", str(trained), "--expansion",
           "2", "--k", "4", "--batch-size", "256", "--device", "cpu", "--quiet"])  # fmt: skip
    capsys.readouterr()
    wider = tmp_path / "wide.npy"
    np.save(wider, np.zeros((300, 20), dtype=np.float32))
    assert _main(["sae", "eval", str(trained), "--activations", str(wider), "--quiet"]) == 2
    assert "reads d_in 12 channels, but the activations have 20" in _error_line(capsys)

    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert _main(["sae", "eval", str(trained), "--activations", str(pickled), "--quiet"]) == 2
    assert "is not a readable .npy array" in _error_line(capsys)
    assert _main(["sae", "train", "--run", str(tmp_path / "no-run"), "--site", "s", "--out",
                  str(out), "--quiet"]) == 2  # fmt: skip
    assert "does not exist" in _error_line(capsys)


@pytest.mark.slow
def test_train_streamed_from_generation_and_eval_with_the_splice(tmp_path, capsys):
    out = tmp_path / "sae"
    gen = ["--model", "tiny", "--site", "unet.up_blocks.1", "--steps", "2"]
    code = _main(["sae", "train", *gen, "--prompts", "shapes:2", "--out", str(out),
                  "--expansion", "2", "--k", "4", "--batch-size", "256", "--device", "cpu",
                  "--quiet"])  # fmt: skip
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    assert not list(out.glob("*.npy")) and not list(out.glob("*.zarr"))  # nothing but the SAE
    assert _main(["sae", "eval", str(out), *gen, "--prompts", "shapes:2:1:heldout", "--splice",
                  "--json", "--quiet"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 2 * 2 * 256 and set(result["groups"]) == {"501", "1"}
    assert result["splice"]["error_kept_identical"] and result["splice"]["pixel_mse"] > 0
    assert 0 <= result["splice"]["attributes_reconstruction"]["colour"] <= 1
    assert _main(["sae", "info", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)["metadata"]
    assert meta["branch"] == "cond" and meta["timesteps"] == [501.0, 1.0]
    assert meta["site_semantics"] == "output" and meta["model_name"] == "tiny"
