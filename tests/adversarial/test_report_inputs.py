"""``diffprobe report`` and ``diffprobe inspect`` fed what users type wrong: a run that is not
there, a file for a run, a folder without diffprobe output, an output that is not HTML or is
someone's file, a port out of range. Each is refused with exit 2, one line naming the input,
and nothing in the sandbox changes."""

from __future__ import annotations

import pytest


@pytest.fixture
def plain_folder(sandbox):
    folder = sandbox / "Documents" / "photos"
    folder.mkdir()
    (folder / "cat.png").write_bytes(b"\x89PNG not really")
    return folder


@pytest.mark.parametrize("command", ["report", "inspect"])
def test_run_that_is_not_there(refused, command):
    refused([command, "no_such_run", *(["--out", "r.html"] if command == "report" else [])],
            ["no_such_run", "no such folder"])  # fmt: skip


@pytest.mark.parametrize("command", ["report", "inspect"])
def test_a_file_for_a_run(refused, sandbox, command):
    extra = ["--out", "r.html"] if command == "report" else []
    refused([command, sandbox / "Documents" / "thesis.tex", *extra], ["thesis.tex", "not a folder"])


@pytest.mark.parametrize("command", ["report", "inspect"])
def test_folder_without_diffprobe_output(refused, plain_folder, command):
    extra = ["--out", "r.html"] if command == "report" else []
    refused([command, plain_folder, *extra], ["photos", "no diffprobe output"])


def test_report_out_not_html(refused, spatial_run_dir):
    refused(["report", spatial_run_dir, "--out", "report.pdf"], ["report.pdf", ".html"])


def test_report_out_is_someones_file(refused, sandbox, spatial_run_dir):
    mine = sandbox / "Documents" / "notes.html"
    mine.write_text("<html>my notes</html>")
    refused(["report", spatial_run_dir, "--out", mine], ["notes.html", "not a diffprobe report"])


def test_report_out_in_missing_folder(refused, spatial_run_dir):
    refused(["report", spatial_run_dir, "--out", "nowhere/r.html"], ["nowhere", "does not exist"])


def test_report_needs_overwrite_for_an_earlier_report(cli, refused, sandbox, spatial_run_dir):
    assert cli("report", spatial_run_dir, "--out", "r.html", "-q").code == 0
    refused(["report", spatial_run_dir, "--out", "r.html"], ["r.html", "--overwrite"])
    assert cli("report", spatial_run_dir, "--out", "r.html", "--overwrite", "-q").code == 0


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_inspect_port_out_of_range(refused, spatial_run_dir, port):
    refused(["inspect", spatial_run_dir, "--port", port], ["--port", port])
