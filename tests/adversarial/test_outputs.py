"""Every command that writes, pointed at places it must not write (issue 15): a user's file or
folder, the home folder, the current folder, the file system's root, a path under a file, another
kind of diffprobe output. Each case is refused with exit 2 and a line naming the path, before any
model is loaded or work is done, and nothing in the sandbox changes (``refused``)."""

from __future__ import annotations

import os

import pytest

PROMPT = ["--prompt", "a red circle"]


@pytest.fixture
def commands(run_dir, spatial_run_dir, things_root):
    """Each writing command, as a function of its output folder (and extra options)."""
    return {
        "extract": lambda out, *more: [
            "extract", "--model", "tiny", "--data", "shapes:4", "--sites", "unet.mid_block",
            "--noise", "0.1", "--out", out, *more, "-q",
        ],
        "align": lambda out, *more: ["align", run_dir, "--things", things_root, "--out", out,
                                     *more, "-q"],
        "probe": lambda out, *more: ["probe", run_dir, "--things", things_root, "--out", out,
                                     *more, "-q"],
        "regress": lambda out, *more: ["regress", run_dir, "--things", things_root, "--target",
                                       "shapes-factors", "--out", out, *more, "-q"],
        "anomalies": lambda out, *more: ["anomalies", spatial_run_dir, "--no-corner", "--out",
                                         out, *more, "-q"],
        "lens": lambda out, *more: ["lens", "--model", "tiny", *PROMPT, "--out", out, *more,
                                    "-q"],
        "train-tiny": lambda out, *more: ["train-tiny", "--out", out, *more, "-q"],
        "demo": lambda out, *more: ["demo", "--out", out, *more, "-q"],
        "attribution": lambda out, *more: ["attribution", "--model", "tiny", *PROMPT, "--out",
                                           out, *more, "-q"],
        "features-capture": lambda out, *more: ["features", "capture", "--model", "tiny",
                                                "--prompts", "shapes:2", "--sites",
                                                "unet.mid_block", "--out", out, *more, "-q"],
        "steer": lambda out, *more: ["steer", "--model", "tiny", "--site", "unet.mid_block",
                                     "--channel", "0", "--strength", "1", "--out", out, *more,
                                     "-q"],
        "dream": lambda out, *more: ["dream", "--model", "tiny", "--site", "unet.mid_block",
                                     "--channel", "0", "--out", out, *more, "-q"],
        "hspace": lambda out, *more: ["hspace", "train", "--model", "tiny", "--source", "red",
                                      "--target", "blue", "--out", out, *more, "-q"],
        "train-tiny-ddpm": lambda out, *more: ["train-tiny-ddpm", "--out", out, *more, "-q"],
        "train-tiny-clip": lambda out, *more: ["train-tiny-clip", "--out", out, *more, "-q"],
    }  # fmt: skip


WRITERS = ["extract", "align", "probe", "regress", "anomalies", "lens", "train-tiny", "demo",
           "attribution", "features-capture", "steer", "dream", "hspace", "train-tiny-ddpm",
           "train-tiny-clip"]  # fmt: skip

# where -> (the --out value relative to the sandbox's home, words the refusal must contain)
PLACES = {
    "a user's file": ("~/.bashrc", ["is a file"]),
    "under a user's file": ("~/.bashrc/out", ["is a file"]),
    "a user's folder": ("~/Documents", ["thesis.tex", "did not write"]),
    "the home folder": ("~", ["did not write"]),
    "the current folder's parent": ("..", ["did not write"]),
}


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("place", list(PLACES))
def test_writers_refuse_what_is_not_theirs(refused, sandbox, commands, command, place):
    out, said = PLACES[place]
    refused(commands[command](out), said)


@pytest.mark.parametrize("where", ["~", ".", "..", "/"])
def test_overwrite_refuses_home_cwd_parents_and_root(refused, sandbox, commands, where):
    refused(commands["extract"](where, "--overwrite"), ["--overwrite", "refuses"])


@pytest.mark.parametrize(
    "command", ["align", "probe", "regress", "anomalies", "lens", "attribution"]
)
def test_another_kind_of_output_is_refused(refused, sandbox, commands, command, run_dir):
    refused(commands[command](run_dir), [str(run_dir), "'extract' output"])


def test_extract_overwrite_keeps_a_file_it_did_not_write(cli, sandbox, commands):
    first = cli(*commands["extract"]("run"))
    assert first.code == 0, first.err
    mine = sandbox / "work" / "run" / "notes.txt"
    mine.write_text("mine")
    again = cli(*commands["extract"]("run", "--noise", "0.2", "--overwrite"))
    assert again.code == 2 and "notes.txt" in again.err and "nothing was deleted" in again.err
    assert mine.read_text() == "mine" and (mine.parent / "run.json").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
@pytest.mark.parametrize("command", WRITERS)
def test_read_only_parent(refused, sandbox, commands, command):
    locked = sandbox / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(commands[command](locked / "out"), ["not writable"])
    finally:
        locked.chmod(0o755)


ANOMALY_OPTIONS = {
    "unknown reference": (["--reference", "mode"], ["--reference", "mode", "mean"]),
    "query outside the grid": (["--query", "1.5,0.2"], ["--query", "1.5"]),
    "query of one number": (["--query", "0.5"], ["--query", "two fractions"]),
    "query not numbers": (["--query", "a,b"], ["--query", "'a,b'"]),
    "negative threshold": (["--threshold", "-1"], ["--threshold", "-1"]),
    "binnings not numbers": (["--binnings", "2,x"], ["--binnings", "'2,x'"]),
    "binning of one": (["--binnings", "1,4"], ["--binnings", "at least 2"]),
    "test fraction of one": (["--test-fraction", "1"], ["--test-fraction", "1"]),
    "zero group": (["--group", "0"], ["--group", "0"]),
    "negative tolerance": (["--tolerance", "-1"], ["--tolerance", "-1"]),
    "site not in the run": (["--sites", "unet.up_blocks.0"], ["unet.up_blocks.0", "not in"]),
    "noise not in the run": (["--noise", "p0.5"], ["p0.5", "not in"]),
    "pooled run": (None, ["pooling", "--pooling none"]),
}


@pytest.mark.parametrize("case", list(ANOMALY_OPTIONS))
def test_anomalies_refuses(refused, sandbox, commands, run_dir, case):
    options, said = ANOMALY_OPTIONS[case]
    if options is None:  # the pooled run instead of the spatial one
        refused(["anomalies", run_dir, "--no-corner", "--out", "out", "-q"], said)
        return
    refused(commands["anomalies"]("out", *options), said)
