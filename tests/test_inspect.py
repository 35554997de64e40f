"""``diffprobe inspect``: the server answers only with files inside its runs (``..``, absolute
paths, encoded traversal, links out of the run: 403; missing: 404), binds loopback unless told,
and the labelling API writes label files that ``diffprobe anomalies`` reads, with precision and
recall against the detector."""

from __future__ import annotations

import http.client
import json
import os

import numpy as np
import pytest

from diffprobe.app.safety import AddressError, Refused, check_bind, inside
from diffprobe.app.server import make_server, serve_in_thread
from diffprobe.app.views import RunRef, StageRef
from diffprobe.data.anomaly_labels import labels_to_table, load_label_table, read_label_file
from diffprobe.io import claim_output, write_bytes, write_csv, write_json


@pytest.fixture
def served(tmp_path):
    """A run with an anomaly stage made by hand (two images, 8x8 norm maps, three detections),
    a secret file beside the run and a link inside the run that points at it; the server runs
    on a free loopback port."""
    root = claim_output(tmp_path / "run", "demo")
    stage = claim_output(root / "anomalies", "anomalies")
    norms = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    buffer = __import__("io").BytesIO()
    np.savez_compressed(buffer, **{"unet.mid_block|p0.2|empty": norms})
    write_bytes(stage / "norm_maps.npz", buffer.getvalue())
    base = {"site": "unet.mid_block", "noise": "p0.2", "condition": "empty", "grid": "8x8"}
    write_csv(stage / "high_norm_detections.csv", [
        {**base, "item": 0, "item_id": "img-a", "y": 2, "x": 5, "score": 2.0},
        {**base, "item": 0, "item_id": "img-a", "y": 6, "x": 0, "score": 1.5},
        {**base, "item": 1, "item_id": "img-b", "y": 1, "x": 1, "score": 1.7},
    ])  # fmt: skip
    write_csv(stage / "high_norm_per_image.csv", [
        {**base, "item": 0, "item_id": "img-a", "detections": 2, "max_score": 2.0},
        {**base, "item": 1, "item_id": "img-b", "detections": 1, "max_score": 1.7},
    ])  # fmt: skip
    (tmp_path / "secret.txt").write_text("not yours")
    (stage / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (root / "leakdir").symlink_to(tmp_path, target_is_directory=True)
    refs = [RunRef(root, [StageRef("demo", root, "."), StageRef("anomalies", stage, "anomalies")])]
    server = make_server(refs, "127.0.0.1", 0)
    serve_in_thread(server)
    yield server, root, stage
    server.shutdown()
    server.server_close()


def _get(server, path: str, method: str = "GET", body: bytes | None = None):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    headers = {"Content-Type": "application/json"} if body else {}
    connection.request(method, path, body=body, headers=headers)  # sent as written: no cleanup
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


@pytest.mark.parametrize("path", [
    "/files/0/../../secret.txt", "/files/0/%2e%2e/%2e%2e/secret.txt",
    "/files/0/%2E%2E%2F%2E%2E%2Fsecret.txt", "/files/0/anomalies/..%2f..%2f..%2fsecret.txt",
    "/files/0//etc/passwd", "/files/0/%2fetc%2fpasswd", "/files/0/anomalies/leak.txt",
    "/files/0/leakdir/secret.txt", "/files/0/..%5c..%5csecret.txt", "/files/0/a%00b",
])  # fmt: skip
def test_traversal_is_forbidden(served, path):
    server, _, _ = served
    status, data = _get(server, path)
    assert status == 403, (path, status, data)
    assert b"not yours" not in data


@pytest.mark.parametrize("path", ["/files/0/nothing.png", "/files/7/anomalies/norm_maps.npz",
                                  "/static/../server.py", "/static/safety.py", "/etc/passwd"])  # fmt: skip
def test_missing_or_unknown_is_not_found(served, path):
    server, _, _ = served
    assert _get(server, path)[0] == 404


def test_files_inside_are_served_as_they_are(served):
    server, _, stage = served
    status, data = _get(server, "/files/0/anomalies/norm_maps.npz")
    assert status == 200 and data == (stage / "norm_maps.npz").read_bytes()


def test_inside_resolves_and_checks(tmp_path):
    (tmp_path / "run" / "a").mkdir(parents=True)
    (tmp_path / "run" / "a" / "f.txt").write_text("x")
    assert inside(tmp_path / "run", "a/f.txt") == (tmp_path / "run" / "a" / "f.txt").resolve()
    assert inside(tmp_path / "run", "a/%66.txt").name == "f.txt"  # decoded once
    for bad, status in (("../run/a/f.txt", 403), ("/etc/passwd", 403), ("a/%2e%2e/f.txt", 403),
                        ("a/g.txt", 404), ("C:/x", 403)):  # fmt: skip
        with pytest.raises(Refused) as refused:
            inside(tmp_path / "run", bad)
        assert refused.value.status == status, bad


def test_bind_loopback_only_unless_asked(capsys):
    assert check_bind("127.0.0.1", False) is None and check_bind("localhost", False) is None
    assert check_bind("::1", False) is None
    with pytest.raises(AddressError, match="0.0.0.0"):
        check_bind("0.0.0.0", False)
    assert "warning" in check_bind("0.0.0.0", True)
    server = make_server([], "0.0.0.0", 0, allow_remote=True)
    server.server_close()
    assert "warning: the inspector listens on 0.0.0.0" in capsys.readouterr().err


def test_labels_are_saved_in_the_anomalies_format_and_scored(served):
    server, _, stage = served
    key = "unet.mid_block|p0.2|empty"

    def label(item, groups):
        body = json.dumps({"run": 0, "stage": 1, "key": key, "item": item, "groups": groups})
        status, data = _get(server, "/api/labels", "POST", body.encode())
        assert status == 200, data
        return json.loads(data)

    label(0, [{"x": 5, "y": 2}, {"x": 3, "y": 3}])
    scores = label(1, [])  # looked at, nothing there
    # by hand: 3 detections on labelled images, (2,5) matches the label at (2,5); the label at
    # (3,3) has no detection within 1 token -> precision 1/3, recall 1/2
    (row,) = scores["rows"]
    assert (row["detections"], row["matched"], row["labels"]) == (3, 1, 2)
    assert row["precision"] == pytest.approx(1 / 3) and row["recall"] == pytest.approx(1 / 2)
    names = [p.name for p in sorted((stage / "labels").glob("*.json"))]
    assert names == ["00000_unet.mid_block.json", "00001_unet.mid_block.json"]
    first = read_label_file(stage / "labels" / names[0])
    assert first["item"] == "img-a" and first["site"] == "unet.mid_block"
    assert first["groups"] == [{"x": 5, "y": 2}, {"x": 3, "y": 3}] and first["grid"] == [8, 8]
    assert json.loads((stage / "label_scores.json").read_text()) == scores
    # the folder (what `diffprobe anomalies --labels` reads) and the table agree
    table = labels_to_table(stage / "labels", ["img-a", "img-b"])
    saved = load_label_table(stage / "labels" / "table.npz")
    for column in ("item", "y", "x", "image_item"):
        assert np.array_equal(table[column], saved[column]), column
    assert saved["y"].tolist() == [2, 3] and saved["image_item"].tolist() == [0, 1]
    # out of the grid and not a number are refused, nothing written
    body = json.dumps({"run": 0, "stage": 1, "key": key, "item": 0, "groups": [{"x": 8, "y": 0}]})
    assert _get(server, "/api/labels", "POST", body.encode())[0] == 400
    assert read_label_file(stage / "labels" / names[0])["groups"][0] == {"x": 5, "y": 2}


def test_the_page_is_served_with_a_strict_policy(served):
    server, _, _ = served
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    connection.request("GET", "/")
    response = connection.getresponse()
    page = response.read().decode()
    policy = response.getheader("Content-Security-Policy")
    connection.close()
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "http" not in page.replace("http-equiv", "")  # nothing from another origin
    assert os.path.basename("/static/app.js") in page


def test_dreams_and_priors_of_a_channel(tmp_path):
    """The dream tab's slider walks the snapshots of ``diffprobe dream``'s layout in step order;
    the priors tab lists ``diffprobe steer --prior`` images of the channel."""
    root = claim_output(tmp_path / "run", "demo")
    dream = claim_output(root / "dream", "dream")
    write_json(dream / "dream.json", {"site": "unet.mid_block"})
    leaf = dream / "channel_0003" / "timestep_0000"
    for step in (20, 5, 10):
        write_bytes(leaf / "snapshots" / f"seed_0_step_{step:04d}.png", b"\x89PNG")
    write_bytes(leaf / "seed_0.png", b"\x89PNG")
    write_bytes(dream / "channel_0004" / "grid.png", b"\x89PNG")
    steer = claim_output(root / "priors", "steer")
    write_bytes(steer / "unet.mid_block" / "channel_0003" / "images" / "prior_image_0.png", b"x")
    refs = [RunRef(root, [StageRef("dream", dream, "dream"), StageRef("steer", steer, "priors")])]
    server = make_server(refs, "127.0.0.1", 0)
    serve_in_thread(server)
    try:
        status, data = _get(server, "/api/dreams?channel=3")
        (found,) = json.loads(data)
        (step,) = found["timesteps"]
        assert [p.rsplit("_", 1)[1] for p in step["snapshots"]] == ["0005.png", "0010.png",
                                                                     "0020.png"]  # fmt: skip
        assert step["final"] == ["dream/channel_0003/timestep_0000/seed_0.png"]
        assert _get(server, "/files/0/" + step["snapshots"][0])[0] == 200
        assert json.loads(_get(server, "/api/dreams?channel=5")[1]) == []
        assert json.loads(_get(server, "/api/dreams?channel=3&site=unet.mid_block")[1]) == [found]
        assert json.loads(_get(server, "/api/dreams?channel=3&site=unet.up_blocks.1")[1]) == []
        (prior,) = json.loads(_get(server, "/api/priors?channel=3")[1])
        assert prior["images"] == ["priors/unet.mid_block/channel_0003/images/prior_image_0.png"]
        assert _get(server, "/api/dreams?channel=x")[0] == 400
    finally:
        server.shutdown()
        server.server_close()
