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
