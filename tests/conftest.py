import os

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
