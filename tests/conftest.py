import os
import tempfile

# No test touches the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tiny models gain nothing from more, and results do not depend on how
# reductions are split across threads.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd_model():
    import diffprobe
    from diffprobe.testing import dummy_sd_pipeline

    return diffprobe.from_pipeline(dummy_sd_pipeline(), name="dummy-sd")


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_stay_in_pytests_folder(tmp_path_factory):
    """Examples in the docs make folders with ``tempfile.mkdtemp()`` (a user keeps them); under
    test they go into pytest's own temporary folder, which pytest prunes, not into /tmp."""
    folder = tmp_path_factory.mktemp("tempfile")
    previous = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(folder)
    os.environ["TMPDIR"] = str(folder)
    yield
    tempfile.tempdir = previous[0]
    if previous[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous[1]


@pytest.fixture(scope="session")
def demo_like_run(tmp_path_factory, sd_model) -> "os.PathLike":
    """A small run folder laid out as ``make demo``'s (the dummy SD pipeline, seconds): a THINGS
    export of the shapes world, a pooled extraction over it (3 noise levels) with its alignment
    folder, an anomaly stage over 6 unpooled shapes-world items, and a lens stage of `tiny`.
    Used by the report and inspector tests (tests/test_report.py, test_inspect.py,
    test_browser.py)."""
    from diffprobe.data.sources import open_source
    from diffprobe.data.things import load_things
    from diffprobe.data.things_export import export_things
    from diffprobe.extract import ExtractionPlan, extract
    from diffprobe.extract.store import open_run
    from diffprobe.io import claim_output
    from diffprobe.stages.align import align_run, write_outputs
    from diffprobe.stages.anomalies import analyse_run
    from diffprobe.stages.lens import lens

    root = claim_output(tmp_path_factory.mktemp("demo_like") / "demo", "demo")
    things_root = export_things(root / "things", images_per_concept=2, n_train=300, n_test=300,
                                n_repeat_triplets=10, repeats=4, seed=0)  # fmt: skip
    sites = ["unet.down_blocks.1", "unet.mid_block"]
    plan = ExtractionPlan(sites=sites, noise_levels=[0.1, 0.3, 0.6], image_size=32, chunk_items=48)
    grid_run = extract(sd_model, open_source(str(things_root)), plan, root / "grid_run",
                       batch_size=48, progress=False)  # fmt: skip
    result = align_run(open_run(grid_run), load_things(things_root), progress=False)
    write_outputs(result, grid_run / "alignment", cka=False)
    plan = ExtractionPlan(sites=sites, noise_levels=[0.2], pooling="none", image_size=32,
                          chunk_items=8)  # fmt: skip
    claim_output(root / "anomalies", "anomalies", entries=("run",))
    spatial = extract(sd_model, open_source("shapes:6"), plan, root / "anomalies" / "run",
                      progress=False)  # fmt: skip
    analyse_run(spatial, root / "anomalies", corner=False, threshold=1.3, progress=False)
    lens(sd_model, "a red circle", layers="0,-1", seeds=[0], steps=2, size=32,
         progress=False).save(root / "lens")  # fmt: skip
    return root
