"""diffprobe.io: the one atomic writer and the folder rule, tested directly; and the CLI's
error path (one line, exit codes, --debug, --version, Ctrl-C)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from diffprobe.io import (
    MARKER,
    OutputError,
    atomic_path,
    check_output,
    claim_output,
    read_marker,
    write_bytes,
    write_json,
)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_writer_files_are_0644_complete_and_leave_no_temporary(tmp_path, umask_022):
    path = write_bytes(tmp_path / "a" / "b.bin", b"abc")
    assert path.read_bytes() == b"abc"
    assert path.stat().st_mode & 0o777 == 0o644
    with atomic_path(tmp_path / "figure.png") as temporary:
        assert temporary.suffix == ".png" and temporary.parent == tmp_path
        temporary.write_bytes(b"png")
    assert (tmp_path / "figure.png").stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "broken.txt") as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("killed half way")
    assert not (tmp_path / "broken.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "figure.png"]


def test_claim_writes_a_marker_and_every_write_is_listed_before_it_lands(tmp_path, monkeypatch):
    out = claim_output(tmp_path / "out", "lens", entries=("lens.json",))
    assert read_marker(out)["kind"] == "lens"
    assert read_marker(out)["entries"] == ["lens.json"]
    write_json(out / "sub" / "deep" / "x.json", {"a": 1})
    write_bytes(out / "grid.png", b"png")
    assert read_marker(out)["entries"] == ["grid.png", "lens.json", "sub"]

    seen = {}
    original = os.replace

    def spy(source, target):  # what the marker lists when each file lands
        seen[os.path.basename(target)] = read_marker(out)["entries"]
        return original(source, target)

    monkeypatch.setattr(os, "replace", spy)
    write_bytes(out / "late.txt", b"x")
    assert "late.txt" in seen["late.txt"]


def test_the_folder_rule(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        check_output(user, "extract")
    with pytest.raises(OutputError, match="notes.txt"):
        claim_output(user, "extract", overwrite=True)
    assert (user / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output(tmp_path / "afile", "extract")
    with pytest.raises(OutputError, match="is a file"):
        check_output(tmp_path / "afile" / "below", "extract")

    lens = claim_output(tmp_path / "lens", "lens")
    write_bytes(lens / "grid.png", b"png")
    with pytest.raises(OutputError, match="'lens' output, not 'extract'"):
        check_output(lens, "extract", overwrite=True)
    check_output(lens, "lens")  # the same kind is fine
    check_output(tmp_path / "empty-or-new", "extract")
    assert not (tmp_path / "empty-or-new").exists()  # checking touches nothing


def test_overwrite_removes_only_what_the_marker_lists_and_refuses_foreign_entries(tmp_path):
    out = claim_output(tmp_path / "run", "extract", entries=("run.json", "features.zarr"))
    write_json(out / "run.json", {})
    write_bytes(out / "features.zarr" / "zarr.json", b"{}")
    nested = claim_output(out / "alignment", "align")
    write_bytes(nested / "alignment.csv", b"a,b\n")
    (out / ".run.json.0123.partial").write_bytes(b"half")  # a crash's leftover temporary
    claim_output(out, "extract", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER]

    write_json(out / "run.json", {})
    (out / "thesis").mkdir()
    (out / "thesis" / "ch1.tex").write_text("mine")
    with pytest.raises(OutputError, match="thesis"):
        claim_output(out, "extract", overwrite=True)
    assert (out / "thesis" / "ch1.tex").read_text() == "mine"
    assert (out / "run.json").is_file()  # nothing at all was deleted

    # a nested diffprobe folder holding a user's file is not diffprobe's either
    (out / "thesis" / "ch1.tex").unlink()
    (out / "thesis").rmdir()
    (nested / "mine.txt").parent.mkdir(parents=True, exist_ok=True)
    claim_output(nested, "align")
    (nested / "mine.txt").write_text("mine")
    with pytest.raises(OutputError, match="alignment"):
        claim_output(out, "extract", overwrite=True)
    assert (nested / "mine.txt").is_file()


@pytest.mark.parametrize("where", ["home", "cwd", "parent", "root"])
def test_overwrite_refuses_home_cwd_its_parents_and_root(tmp_path, monkeypatch, where):
    home = tmp_path / "home"
    work = home / "work" / "project"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    target = {"home": home, "cwd": work, "parent": work.parent, "root": Path(home.anchor)}[where]
    if where != "root":  # a marker that lists everything there: the rule must still refuse
        entries = sorted(p.name for p in target.iterdir())
        (target / MARKER).write_text(json.dumps({"kind": "extract", "entries": entries}))
    with pytest.raises(OutputError) as refused:
        check_output(target, "extract", overwrite=True)
    assert "--overwrite refuses" in str(refused.value)
    assert work.is_dir()


def test_runs_written_before_markers_are_recognised(tmp_path):
    run = tmp_path / "old-run"
    (run / "features.zarr").mkdir(parents=True)
    (run / "progress").mkdir()
    (run / "run.json").write_text(json.dumps({"identity": "abc", "sites": ["unet.mid_block"]}))
    check_output(run, "extract", overwrite=True)
    claim_output(run, "extract")
    assert read_marker(run)["entries"] == ["features.zarr", "progress", "run.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text("{}")  # not a diffprobe run.json
    with pytest.raises(OutputError, match="did not write"):
        check_output(tmp_path / "other", "extract")


# ------------------------------------------------------------------------- the CLI's error path


def run_main(capsys, *args):
    from diffprobe.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_version_and_expected_errors_are_one_line(capsys, tmp_path):
    from importlib.metadata import version

    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out.strip() == f"diffprobe {version('diffprobe')}"
    code, _, err = run_main(capsys, "sites", "sd1.55")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "sd1.5" in err and "Traceback" not in err


def test_unexpected_errors_print_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    import diffprobe.registry

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(diffprobe.registry, "list_models", broken)
    code, _, err = run_main(capsys, "models")
    assert code == 1
    assert err.splitlines() == [
        "error: unexpected ZeroDivisionError: a bug of ours",
        "rerun with --debug for the traceback",
    ]
    with pytest.raises(ZeroDivisionError):
        run_main(capsys, "models", "--debug")


def test_ctrl_c_says_what_is_kept_and_exits_130(capsys, monkeypatch):
    import diffprobe.registry

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffprobe.registry, "list_models", interrupted)
    code, _, err = run_main(capsys, "models")
    assert code == 130
    assert "interrupted" in err and "again" in err and "Traceback" not in err
