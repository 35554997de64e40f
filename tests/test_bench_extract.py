"""benchmarks/extract.py: the three paths it times read the same values, so its ratios compare
the same work. diffprobe's store = a hand-written diffusers loop = nnsight, bit for bit."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "extract.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_extract", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setting(bench, sd_model):
    from diffprobe.data.sources import open_source

    source = open_source("shapes:5:3")
    images = source.load(range(len(source)))
    x0 = sd_model.encode_images(images[:1], 64)
    sites = bench.execution_order(sd_model, bench.choose_sites(sd_model), x0,
                                  sd_model.encode_prompt([""]))  # fmt: skip
    return source, images, sites


def test_sites_are_nine_distinct_in_execution_order(bench, sd_model, setting):
    _, _, sites = setting
    assert len(set(sites)) == 9
    # every block of the dummy UNet, then attention sublayers; a sublayer runs before its block
    assert {"unet.down_blocks.0", "unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.0",
            "unet.up_blocks.1"} <= set(sites)  # fmt: skip
    assert sites.index("unet.down_blocks.1.attentions.0") < sites.index("unet.down_blocks.1")
    assert sites.index("unet.mid_block.attentions.0") < sites.index("unet.mid_block")
    assert sites[-1] == "unet.up_blocks.1"


@pytest.mark.slow
def test_hand_loop_and_nnsight_equal_the_store(bench, sd_model, setting, tmp_path):
    source, images, sites = setting
    noise = [0.05, 0.7]
    # batch 2 over 5 items: a short last batch; chunk 4 puts a batch boundary inside a chunk
    root = bench.diffprobe_extract(sd_model, source, sites, noise, batch_size=2, seed=3, size=64,
                                   chunk_items=4, root=tmp_path / "run")  # fmt: skip
    store = bench.read_run(root, sites, noise)
    hand = bench.plain_grid(sd_model.pipe, images, sites, noise, batch_size=2, seed=3, size=64)
    assert set(hand) == set(store) and len(store) == 18
    assert bench.compare(store, hand) == {"equal": True, "max_abs_diff": 0.0, "arrays": 18}
    # other items give other features: the comparison can fail
    other = bench.plain_grid(sd_model.pipe, images[::-1].copy(), sites, noise, batch_size=2,
                             seed=3, size=64)  # fmt: skip
    assert not bench.compare(store, other)["equal"]
    pytest.importorskip("nnsight")
    traced = bench.nnsight_grid(sd_model.pipe, images, sites, noise, batch_size=2, seed=3, size=64)
    assert bench.compare(store, traced)["equal"]


def test_seed_unit_full_forward_reads_the_same_site(bench, sd_model, setting, tmp_path):
    _, images, sites = setting
    site = "unet.mid_block"
    values = bench.seed_unit(lambda: sd_model.pipe, images[:2], site, 0.3, batch_size=2, seed=0,
                             size=64, save=tmp_path / "unit.npy")  # fmt: skip
    grid = bench.plain_grid(sd_model.pipe, images[:2], sites, [0.3], batch_size=2, seed=0, size=64)
    assert np.array_equal(values, grid[(site, 0.3)])
    assert np.array_equal(np.load(tmp_path / "unit.npy", allow_pickle=False), values)


def test_flow_model_paths_equal_the_store(bench, tmp_path):
    """SD3 (rectified flow, MMDiT blocks returning (text, image) tokens): same equalities."""
    import diffprobe
    from diffprobe.data.sources import open_source
    from diffprobe.testing.sd3 import dummy_sd3_pipeline

    model = diffprobe.from_pipeline(dummy_sd3_pipeline(), name="dummy-sd3")
    source = open_source("shapes:3")
    images = source.load(range(3))
    sites = bench.choose_sites(model)
    assert sites == [f"transformer.transformer_blocks.{i}" for i in range(3)]  # all it has
    noise = [0.1, 0.8]
    root = bench.diffprobe_extract(model, source, sites, noise, batch_size=2, seed=0,
                                   size=model.resolution, chunk_items=4, root=tmp_path / "run")  # fmt: skip
    store = bench.read_run(root, sites, noise)
    hand = bench.plain_grid(model.pipe, images, sites, noise, batch_size=2, seed=0,
                            size=model.resolution)  # fmt: skip
    assert bench.compare(store, hand)["equal"]
    pytest.importorskip("nnsight")
    traced = bench.nnsight_grid(model.pipe, images, sites, noise, batch_size=2, seed=0,
                                size=model.resolution)  # fmt: skip
    assert bench.compare(store, traced)["equal"]


def test_performance_page_commands_parse(bench):
    """Every benchmarks/extract.py command in docs/performance.md uses options the script has."""
    import re
    import shlex

    page = (Path(__file__).parents[1] / "docs" / "performance.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            if "benchmarks/extract.py" in words:
                commands.append(words[words.index("benchmarks/extract.py") + 1 :])
    assert len(commands) >= 4
    for argv in commands:
        args = bench.parse(argv)  # argparse exits on an unknown option
        assert args.out is not None
