"""The grid engine and the store: invariances, resume after kill -9, shards, hand-hook parity."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import diffprobe
from diffprobe.data.sources import DataError, open_source
from diffprobe.extract import Condition, ExtractionError, ExtractionPlan, extract
from diffprobe.extract.store import StoreError, open_run

SITES = ["unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.0.attentions.1"]


def make_plan(**overrides):
    settings = dict(
        sites=SITES,
        noise_levels=[0.1, 0.6],
        conditions=[Condition("empty"), Condition("cap", "captions", guidance_scale=4.0)],
        pooling="mean",
        chunk_items=4,
        seed=5,
    )
    settings.update(overrides)
    return ExtractionPlan(**settings)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    from diffprobe.testing import dummy_sd_pipeline

    folder = tmp_path_factory.mktemp("pipe") / "dummy-sd"
    dummy_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(pipeline_folder):
    return diffprobe.load(pipeline_folder)


@pytest.fixture(scope="module")
def source():
    return open_source("shapes:10")


@pytest.fixture(scope="module")
def reference_run(model, source, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "reference"
    extract(model, source, make_plan(), root, batch_size=4, progress=False)
    return open_run(root)


def assert_runs_equal(a, b, exact=True):
    assert a.keys() == b.keys()
    for key in a.keys():
        if exact:
            assert np.array_equal(a.get(*key), b.get(*key)), key
        else:
            np.testing.assert_allclose(
                a.get(*key), b.get(*key), rtol=1e-4, atol=1e-4, err_msg=str(key)
            )


def test_store_layout_and_provenance(reference_run, source):
    run = reference_run
    assert run.complete
    assert run.conditions == ["empty", "cap.uncond", "cap.cond"]
    assert run.noise_keys == ["p0.1", "p0.6"]
    values = run.get("unet.mid_block", 0.1, "cap.cond")
    assert values.shape == (10, 64) and np.isfinite(values).all()
    info = run.info
    assert [n["timestep"] for n in info["noise"]] == [100.0, 600.0]
    assert len(info["items"]) == 10 and all(len(i["sha256"]) == 64 for i in info["items"])
    assert info["versions"]["torch"] == torch.__version__
    # plain zarr reads the store without diffprobe
    import zarr

    group = zarr.open_group(str(run.root / "features.zarr"), mode="r")
    assert np.array_equal(group["unet.mid_block/cap.cond/p0.1"][...], values)
    # exactly these folders and files, nothing more: each one is slow to create on some disks
    sites = [s.replace(":", "~") for s in run.sites]
    groups = [*sites, *(f"{s}/{c}" for s in sites for c in run.conditions)]
    arrays = [f"{s}/{c}/{n}" for s in sites for c in run.conditions for n in run.noise_keys]
    chunks = [f"{a}/c.{k}.0" for a in arrays for k in range(run.n_chunks)]
    features = run.root / "features.zarr"
    found = {p.relative_to(features).as_posix(): p.is_dir() for p in features.rglob("*")}
    assert {p for p, folder in found.items() if folder} == {*groups, *arrays}
    assert {p for p, folder in found.items() if not folder} == {
        "zarr.json",
        *(f"{p}/zarr.json" for p in groups + arrays),
        *chunks,
    }
    labelled = run.xarray("unet.mid_block", 0.1, "empty")
    assert (
        labelled.dims == ("item", "channel")
        and labelled.coords["label"].values[0] == source.items[0].label
    )


def test_cfg_branches_are_stored_apart(reference_run):
    cond = reference_run.get("unet.mid_block", 0.6, "cap.cond")
    uncond = reference_run.get("unet.mid_block", 0.6, "cap.uncond")
    empty = reference_run.get("unet.mid_block", 0.6, "empty")
    assert not np.allclose(cond, uncond)
    np.testing.assert_allclose(uncond, empty, rtol=1e-5, atol=1e-5)  # uncond is the empty prompt


def test_stored_feature_equals_handwritten_hook_on_plain_pipeline(reference_run, model, source):
    """Reproduce item 7 at noise level 0.6 with plain diffusers and the documented formula."""
    from diffusers import DDPMScheduler

    pipe = model.pipe
    item = 7
    image = torch.from_numpy(source.items[item].load()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(
            latents.shape[1:],
            generator=torch.Generator().manual_seed(
                int(np.random.SeedSequence([5, item]).generate_state(1)[0])
            ),
        )[None]
        t = torch.tensor([600])
        noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, t)
        ids = pipe.tokenizer(
            [source.items[item].caption],
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        text = pipe.text_encoder(ids)[0]
        seen = {}
        handle = pipe.unet.mid_block.register_forward_hook(lambda m, a, o: seen.update(v=o))
        try:
            pipe.unet(noisy, t, encoder_hidden_states=text)
        finally:
            handle.remove()
    expected = seen["v"].mean(dim=(2, 3))[0].numpy()
    stored = reference_run.get("unet.mid_block", 0.6, "cap.cond")[item]
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_batch_size_does_not_change_results(reference_run, model, source, tmp_path):
    # Per-item seeded noise and fixed chunks make the computation per item the same; CPU kernels
    # still round differently for different batch shapes, so this is equality to float tolerance
    # (measured max difference: docs/performance.md).
    extract(model, source, make_plan(), tmp_path / "bs1", batch_size=1, progress=False)
    assert_runs_equal(reference_run, open_run(tmp_path / "bs1"), exact=False)


@pytest.mark.slow
def test_two_shards_give_the_identical_store(reference_run, model, source, tmp_path):
    for index in (1, 0):  # any order
        extract(
            model,
            source,
            make_plan(),
            tmp_path / "sharded",
            batch_size=4,
            shard=(index, 2),
            progress=False,
        )
    assert_runs_equal(reference_run, open_run(tmp_path / "sharded"))


CLI = [sys.executable, "-m", "diffprobe.cli"]


def cli_extract(folder, out, *extra):
    return [
        *CLI,
        "extract",
        "--model",
        str(folder),
        "--data",
        "shapes:10",
        "--sites",
        " ".join(SITES),
        "--noise",
        "0.1,0.6",
        "--condition",
        "captions",
        "--guidance-scale",
        "4",
        "--seed",
        "5",
        "--chunk-items",
        "4",
        "--batch-size",
        "4",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


@pytest.mark.parametrize(
    ("dtype", "shape", "n_items", "chunk_items"),
    [("float32", (3,), 10, 4), ("float16", (2, 3, 3), 8, 4), ("float32", (5, 2), 3, 4)],
)
def test_store_files_are_byte_identical_to_zarrs_own_writes(
    tmp_path, dtype, shape, n_items, chunk_items
):
    """RunStore writes zarr's files itself (docs/store.md); every file must equal, byte for
    byte, what zarr writes for the same arrays: metadata, full chunks and the padded last one."""
    import zarr

    from diffprobe.extract.store import FEATURES, RunStore

    rng = np.random.default_rng(0)
    paths = ["unet.mid_block/empty/p0.1", "unet.mid_block/empty/p0.5", "unet.down~x/c.cond/t250"]
    values = {p: rng.standard_normal((n_items, *shape)).astype(dtype) for p in paths}
    ours = RunStore(tmp_path / "ours")
    for first in range(0, n_items, chunk_items):  # one chunk of every array at a time
        ours.write_rows({p: v[first : first + chunk_items] for p, v in values.items()}, first,
                        n_items, chunk_items, dtype)  # fmt: skip
    group = zarr.open_group(str(tmp_path / "zarr" / FEATURES), mode="w", zarr_format=3)
    for path, v in values.items():
        group.create_array(path, shape=v.shape, chunks=(chunk_items, *shape), dtype=dtype,
                           fill_value=np.nan, compressors=None,
                           chunk_key_encoding={"name": "default", "separator": "."})[...] = v  # fmt: skip

    def files(root):
        return {
            str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()
        }

    theirs, written = files(tmp_path / "zarr" / FEATURES), files(tmp_path / "ours" / FEATURES)
    assert sorted(written) == sorted(theirs)
    assert all(written[name] == theirs[name] for name in theirs)
    reread = zarr.open_group(str(tmp_path / "ours" / FEATURES), mode="r")
    assert all(np.array_equal(reread[p][...], v) for p, v in values.items())
    assert not list((tmp_path / "ours").rglob("*.partial"))


def test_store_refuses_an_array_of_another_shape_and_shards_share_arrays(tmp_path):
    from diffprobe.extract.store import FEATURES, RunStore

    one, two = RunStore(tmp_path), RunStore(tmp_path)  # two shards of one run
    one.write_rows({"s/empty/p0.1": np.ones((2, 3), np.float32)}, 0, 4, 2, "float32")
    two.write_rows({"s/empty/p0.1": np.zeros((2, 3), np.float32)}, 2, 4, 2, "float32")
    import zarr

    stored = zarr.open_group(str(tmp_path / FEATURES), mode="r")["s/empty/p0.1"][...]
    assert np.array_equal(stored, np.repeat([[1.0], [0.0]], 2, axis=0) * np.ones((4, 3)))
    with pytest.raises(StoreError, match=r"s/empty/p0.1 .* different extraction"):
        RunStore(tmp_path).write_rows({"s/empty/p0.1": np.ones((2, 5), np.float32)}, 0, 4, 2,
                                      "float32")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("beside_compute", [False, True], ids=["cpu-writes", "gpu-writes"])
def test_a_failed_write_leaves_its_chunk_unmarked_and_a_rerun_completes_it(
    model, source, reference_run, tmp_path, monkeypatch, beside_compute
):
    """Both ways of writing (after each chunk on every core; on a writer thread beside the
    compute, as on a GPU) fill the same store, and neither marks a chunk with a failed write."""
    from diffprobe.extract import engine
    from diffprobe.extract import store as store_module

    monkeypatch.setattr(engine, "_writes_beside_compute", lambda model: beside_compute)

    real_write = store_module.RunStore.write_rows

    def failing_write(self, features, first, *args, **kwargs):
        if first == 4 and any("/cap." in path for path in features):  # chunk 1, some arrays
            raise OSError("disk full (simulated)")
        return real_write(self, features, first, *args, **kwargs)

    monkeypatch.setattr(store_module.RunStore, "write_rows", failing_write)
    with pytest.raises(OSError, match="simulated"):
        extract(model, source, make_plan(), tmp_path / "run", batch_size=4, progress=False)
    monkeypatch.setattr(store_module.RunStore, "write_rows", real_write)
    done = sorted(p.name for p in (tmp_path / "run" / "progress").glob("*.done"))
    assert done == ["chunk-000000.done"]
    extract(model, source, make_plan(), tmp_path / "run", batch_size=4, progress=False)
    assert_runs_equal(open_run(tmp_path / "run"), reference_run)


@pytest.mark.slow
def test_two_processes_fill_one_store(pipeline_folder, model, source, tmp_path):
    extract(
        model,
        source,
        make_plan(conditions=[Condition("captions", "captions", guidance_scale=4.0)]),
        tmp_path / "single",
        batch_size=4,
        progress=False,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    procs = [
        subprocess.Popen(
            cli_extract(pipeline_folder, tmp_path / "two", "--shard", f"{i}/2"),
            env=env,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert_runs_equal(open_run(tmp_path / "single"), open_run(tmp_path / "two"))


@pytest.mark.slow
def test_resume_after_kill_minus_9(pipeline_folder, model, source, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        cli_extract(pipeline_folder, out, "--batch-size", "1"), env=env, stderr=subprocess.DEVNULL
    )
    progress = out / "progress"
    deadline = time.time() + 240
    while (
        time.time() < deadline and not list(progress.glob("*.done"))
        if progress.exists()
        else time.time() < deadline
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.read_text() for p in progress.glob("*.done")}
    assert 1 <= len(finished) < 3, "the run was not killed midway"
    with pytest.raises(StoreError, match="incomplete"):
        open_run(out).get("unet.mid_block", 0.1, "captions.cond")
    # the same command again, in this process (a fresh interpreter only adds seconds of
    # imports): it raises SystemExit on any failure
    from diffprobe.cli import main

    main(cli_extract(pipeline_folder, out, "--batch-size", "1")[len(CLI) :])
    # finished chunks were not recomputed: their markers are untouched
    assert all((progress / name).read_text() == text for name, text in finished.items())
    extract(
        model,
        source,
        make_plan(conditions=[Condition("captions", "captions", guidance_scale=4.0)]),
        tmp_path / "whole",
        batch_size=1,
        progress=False,
    )
    assert_runs_equal(open_run(out), open_run(tmp_path / "whole"))


def test_a_different_extraction_into_the_same_folder_is_refused(model, source, reference_run):
    with pytest.raises(ExtractionError, match="--overwrite"):
        extract(model, source, make_plan(seed=6), reference_run.root, progress=False)


@pytest.mark.slow
def test_runs_in_the_first_store_layout_open_and_are_not_resumed_into_the_new_one(
    model, source, reference_run, tmp_path
):
    """Run format 1 nested the noise level above the condition; such runs still read the same,
    and resuming one with this diffprobe stops instead of mixing two layouts in one folder."""
    import shutil

    old = tmp_path / "format-1"
    shutil.copytree(reference_run.root, old)
    features = old / "features.zarr"
    for site, noise, condition in reference_run.keys():
        s = site.replace(":", "~")
        (features / s / noise).mkdir(exist_ok=True)
        shutil.copy(features / "zarr.json", features / s / noise / "zarr.json")  # a group
        shutil.move(features / s / condition / noise, features / s / noise / condition)
    for site in reference_run.sites:
        for condition in reference_run.conditions:
            shutil.rmtree(features / site.replace(":", "~") / condition)
    info = json.loads((old / "run.json").read_text())
    assert info["format"] == "diffprobe-run/2"
    info["format"] = "diffprobe-run/1"
    (old / "run.json").write_text(json.dumps(info))

    assert_runs_equal(open_run(old), reference_run)
    assert open_run(old).array("unet.mid_block", 0.6, "cap.cond").shape == (10, 64)
    with pytest.raises(ExtractionError, match="diffprobe-run/1 .*--overwrite"):
        extract(model, source, make_plan(), old, batch_size=4, progress=False)
    info["format"] = "diffprobe-run/9"
    (old / "run.json").write_text(json.dumps(info))
    with pytest.raises(StoreError, match="'diffprobe-run/9' is not one this diffprobe reads"):
        open_run(old).get("unet.mid_block", 0.1)
    extract(model, source, make_plan(), old, batch_size=4, progress=False, overwrite=True)
    assert_runs_equal(open_run(old), reference_run)


def test_unreadable_images_are_reported_by_path(tmp_path, model):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tmp_path / label / "ok.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"dog/broken\.png.*--on-error skip"):
        open_source(tmp_path)
    source = open_source(tmp_path, on_error="skip")
    assert [it.label for it in source.items] == ["cat", "dog"]
    run = extract(
        model,
        source,
        make_plan(conditions=[Condition("t", "template", "a photo of a {label}")]),
        tmp_path / "run",
        progress=False,
    )
    info = json.loads((run / "run.json").read_text())
    assert info["data"]["skipped"][0]["path"].endswith("broken.png")


def test_bad_plans_fail_before_any_work(model, source, tmp_path):
    with pytest.raises(ExtractionError, match="not both"):
        make_plan(timesteps=[10.0])
    with pytest.raises(ExtractionError, match="not in the denoiser"):
        extract(
            model,
            source,
            make_plan(sites=["text_encoder.encoder.layers.1"]),
            tmp_path / "x",
            progress=False,
        )
    with pytest.raises(diffprobe.errors.UnknownSiteError, match="did you mean"):
        extract(model, source, make_plan(sites=["unet.midblock"]), tmp_path / "y", progress=False)
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_changed_weights_in_the_same_folder_are_a_different_extraction(
    pipeline_folder, source, tmp_path
):
    model = diffprobe.load(pipeline_folder)
    plan = make_plan(noise_levels=[0.1], conditions=[Condition("empty")])
    extract(model, source, plan, tmp_path / "run", batch_size=4, progress=False)
    with torch.no_grad():
        model.denoiser.conv_in.bias.add_(1.0)  # as if retrained
    with pytest.raises(ExtractionError, match="different extraction"):
        extract(model, source, plan, tmp_path / "run", batch_size=4, progress=False)
    extract(model, source, plan, tmp_path / "run", batch_size=4, overwrite=True, progress=False)
    assert open_run(tmp_path / "run").complete
