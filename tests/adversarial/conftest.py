"""The adversarial input corpus: the command line fed what users really type wrong.

Every case runs ``diffprobe`` in this process (``diffprobe.cli.main``, the console entry point)
inside a sandbox folder that is also ``$HOME`` and the current folder's parent, and checks the
promises of issue 15: a clear one-line error naming the bad input, exit code 2, no traceback,
and nothing created, changed or removed anywhere in the sandbox (so no folder is left behind by
a rejected command and no file outside a run is touched).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from diffprobe.data.sources import open_source

# the dummy SD pipeline's sites the data fixtures extract
SITES = ["unet.down_blocks.1", "unet.mid_block"]


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: files with size, content hash and mode, folders as such."""
    found: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = ("link", str(path.readlink()))
        elif path.is_dir():
            found[key] = ("dir", path.stat().st_mode & 0o777)
        else:
            data = path.read_bytes()
            found[key] = ("file", len(data), hashlib.sha256(data).hexdigest(), path.stat().st_mode)
    return found


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Path:
    """A home folder with a user's files in it; the current folder is ``~/work`` (empty)."""
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / ".bashrc").write_text("export PATH\n")
    (home / "Documents" / "thesis.tex").write_text("\\chapter{One}\n")
    work = home / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli("extract", "--model", ...)`` -> Outcome(code, stdout, stderr)."""
    from diffprobe.cli import main

    # the CLI's --quiet sets TQDM_DISABLE for its process; give it back after each case
    monkeypatch.delenv("TQDM_DISABLE", raising=False)

    def run(*args) -> Outcome:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return run


def assert_rejected(outcome: Outcome, names: str | list[str], code: int = 2) -> None:
    """Refused as a user deserves: ``code``, no traceback, the bad input named on stderr."""
    assert outcome.code == code, (outcome.code, outcome.err[-2000:])
    assert "Traceback" not in outcome.err and "Traceback" not in outcome.out, outcome.err
    assert "rerun with --debug" not in outcome.err, outcome.err  # an expected error, not a crash
    for name in [names] if isinstance(names, str) else names:
        assert name.lower() in outcome.err.lower(), (name, outcome.err)


@pytest.fixture
def refused(sandbox, cli):
    """``refused(["extract", ...], names)``: run the command, check it was refused with
    ``names`` in the message and that nothing under the sandbox changed."""

    def check(args, names, code: int = 2) -> Outcome:
        before = tree(sandbox)
        outcome = cli(*args)
        assert_rejected(outcome, names, code)
        after = tree(sandbox)
        assert after == before, {
            "added": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after)),
            "changed": sorted(k for k in before if k in after and before[k] != after[k]),
        }
        return outcome

    return check


# ------------------------------------------------------------------ THINGS roots and runs


@pytest.fixture(scope="package")
def things_root(tmp_path_factory) -> Path:
    from diffprobe.data.things_export import export_things

    return export_things(
        tmp_path_factory.mktemp("things"),
        images_per_concept=2,
        n_train=600,
        n_test=600,
        n_repeat_triplets=20,
        repeats=6,
        seed=0,
    )


@pytest.fixture(scope="package")
def run_dir(things_root, tmp_path_factory, sd_model) -> Path:
    """A pooled run over the THINGS export: 96 items, 2 sites, 2 noise levels."""
    from diffprobe.extract import ExtractionPlan, extract

    plan = ExtractionPlan(sites=SITES, noise_levels=[0.1, 0.5], image_size=32, chunk_items=32)
    out = tmp_path_factory.mktemp("run") / "run"
    return extract(sd_model, open_source(things_root), plan, out, batch_size=48, progress=False)


@pytest.fixture(scope="package")
def spatial_run_dir(tmp_path_factory, sd_model) -> Path:
    """An unpooled run of 6 shapes-world items (what ``diffprobe anomalies`` reads)."""
    from diffprobe.extract import ExtractionPlan, extract

    plan = ExtractionPlan(sites=SITES, noise_levels=[0.2], pooling="none", image_size=32,
                          chunk_items=8)  # fmt: skip
    out = tmp_path_factory.mktemp("spatial") / "run"
    return extract(sd_model, open_source("shapes:6"), plan, out, progress=False)
