import json
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

# transformers and diffusers give their loggers a handler bound to the sys.stderr of the moment
# they are first used; first used inside a test that captures output (capsys), that stream is
# closed after the test and every later message is a "Logging error" traceback on stderr (which
# the command-line tests refuse). Set up here, on the session's stderr, they do not depend on
# which test runs first (a single file, an xdist worker's share).
import diffusers.utils.logging  # noqa: E402
import transformers.utils.logging  # noqa: E402

transformers.utils.logging.get_verbosity()
diffusers.utils.logging.get_verbosity()


@pytest.fixture(scope="session")
def sd_model():
    import diffprobe
    from diffprobe.testing import dummy_sd_pipeline

    return diffprobe.from_pipeline(dummy_sd_pipeline(), name="dummy-sd")


@pytest.fixture(scope="session", autouse=True)
def _the_command_line_is_built_once():
    """typer rebuilds the click command from the app's functions (their signatures and string
    annotations evaluated, about 0.07 s) on every call of ``diffprobe.cli.main``; the suite calls
    it in-process some 500 times, a fifth of the fast loop's time. An app's command is built
    once here and reused: click parses each call afresh, and the app is complete at import
    (every command registered by ``diffprobe.cli``). The subprocess tests build it as a user's
    shell does."""
    import typer.main

    original = typer.main.get_command
    built: dict[int, tuple] = {}

    def get_command(instance):
        # keyed by the app and its registrations: an app given more commands is built anew
        key = (id(instance), len(instance.registered_commands), len(instance.registered_groups))
        if key not in built or built[key][0] is not instance:
            built[key] = (instance, original(instance))
        return built[key][1]

    typer.main.get_command = get_command
    yield
    typer.main.get_command = original


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


@pytest.fixture(scope="session")
def features_like_run(tmp_path_factory, sd_model) -> dict:
    """The feature stages chained on the dummy SD pipeline (seconds): an activity run (3 prompts
    × 2 seeds, 4 DDIM steps, CFG; ``unet.mid_block`` as channels, ``unet.up_blocks.1`` through
    an SAE-like encoder named ``TopKSAE.encode``), its ``features analyse`` folder, a ``steer
    --prior`` folder for two channels with activity peaks, and a 2-step dream of those channels
    at 0 and their peaks (``read_peaks``) from their priors (``read_priors``). Used by
    tests/test_features_join.py and test_browser.py."""
    from diffprobe import features
    from diffprobe.cli.dream import _timesteps
    from diffprobe.stages.dream import DreamSettings, dream_targets, read_priors

    root = tmp_path_factory.mktemp("features_like") / "study"
    site, sae_site = "unet.mid_block", "unet.up_blocks.1"
    weights = {}

    def encode(tokens):  # an SAE encoder's shape: (items, tokens, C) -> (items, tokens, 12)
        if "w" not in weights:
            weights["w"] = torch.randn(tokens.shape[-1], 12, generator=torch.Generator()
                                       .manual_seed(0))  # fmt: skip
        return torch.relu(tokens @ weights["w"].to(tokens))

    plan = features.ActivityPlan(size=32, sites=[site, sae_site], seeds=[0, 1], steps=4,
                                 guidance_scale=5.0, chunk_items=4)  # fmt: skip
    prompts = ["a red circle", "a blue square", "a green star"]
    run = features.capture_activity(sd_model, prompts, plan, root / "activity",
                                    transforms={sae_site: encode},
                                    transform_names={sae_site: "TopKSAE.encode"},
                                    batch_size=6, progress=False)  # fmt: skip
    analysis = features.analyse_activity(run, root / "analysis", examples=3, top_k=4,
                                         windows=[(0, 500)], peak_distance=50,
                                         plot_channels=1)  # fmt: skip
    peaks = json.loads((analysis / "activity_peaks.json").read_text())[site]
    targets = [int(c) for c, found in peaks.items() if found][:2]
    prior = features.steer_to_folder(
        sd_model, [features.Steer(site, channel=c, strength=2.0) for c in targets],
        root / "prior", prompts=[""], seeds=[1024, 1111], steps=2, guidance_scale=1.0, size=32,
        prior=True, progress=False,
    )  # fmt: skip
    table = _timesteps("0,peaks", analysis, targets, site)
    starts = read_priors(prior, site, targets, dream_shape(sd_model))
    dream_targets(sd_model, site, targets, table, [0, 1], root / "dream", prior=starts,
                  settings=DreamSettings(steps=2, snapshot_every=1), size=32,
                  progress=False, prior_source=str(prior))  # fmt: skip
    return {"root": root, "run": run, "analysis": analysis, "prior": prior,
            "dream": root / "dream", "site": site, "sae_site": sae_site, "targets": targets,
            "table": table}  # fmt: skip


def dream_shape(model, size: int = 32):
    from diffprobe.interventions.dream import input_shape

    return input_shape(model, size)


def _pytests(handler) -> bool:
    return type(handler).__module__.startswith("_pytest")


def _global_state() -> dict:
    """What a test may change for the tests after it: environment, working folder, torch's
    thread count and grad mode, the root logger, the libraries' verbosity."""
    import logging

    root = logging.getLogger()
    state = {
        # pytest's own variable names the running test and phase
        "environ": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
        "cwd": os.getcwd(),
        "threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "root_level": root.level,
        # pytest's own capture handlers come and go with each phase of a test
        "root_handlers": [h for h in root.handlers if not _pytests(h)],
        "tempdir": tempfile.tempdir,
    }
    for name in ("transformers", "diffusers"):
        state[f"{name}_level"] = logging.getLogger(name).level
    return state


def _restore(state: dict) -> None:
    import logging

    current = os.environ.get("PYTEST_CURRENT_TEST")
    os.environ.clear()
    os.environ.update(state["environ"])
    if current is not None:
        os.environ["PYTEST_CURRENT_TEST"] = current
    os.chdir(state["cwd"])
    torch.set_num_threads(state["threads"])
    torch.set_grad_enabled(state["grad"])
    root = logging.getLogger()
    root.setLevel(state["root_level"])
    root.handlers[:] = [h for h in root.handlers if _pytests(h)] + state["root_handlers"]
    tempfile.tempdir = state["tempdir"]
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(state[f"{name}_level"])


@pytest.fixture(autouse=True)
def _no_global_state_leaks(request):
    """Every test leaves the process as it found it: what a test (or the CLI's ``main`` that it
    calls in-process: ``--quiet`` sets ``TQDM_DISABLE`` and the root logger's level, ``--threads``
    torch's thread count) changed is put back after it, so no test depends on the order the
    tests run in. ``DIFFPROBE_REPORT_LEAKS=1`` lists the tests that changed something."""
    before = _global_state()
    yield
    after = _global_state()
    if after != before:
        if os.environ.get("DIFFPROBE_REPORT_LEAKS"):
            changed = sorted(k for k in before if before[k] != after[k])
            if "environ" in changed:
                keys = set(before["environ"]) ^ set(after["environ"]) | {
                    k for k in before["environ"].keys() & after["environ"].keys()
                    if before["environ"][k] != after["environ"][k]}  # fmt: skip
                changed[changed.index("environ")] = f"environ{sorted(keys)}"
            with open(os.environ["DIFFPROBE_REPORT_LEAKS"], "a") as log:
                log.write(f"{request.node.nodeid}: {', '.join(changed)}\n")
        _restore(before)


# The longest tests (processes each started, killed and rerun; tmp_path their only fixture), in
# seconds on an idle core: under pytest-xdist they go first, so that no worker is left with one
# of them while the other has run dry (worksteal hands out the rest in file order).
LONGEST_FIRST = (
    # ~93 s where CI's one-node cluster runs (skipped in a moment elsewhere); last in file order
    # it was the suite's tail: 4 min 29 s in CI against 3 min 20 s without a cluster
    "tests/test_runner_slurm.py::test_slurm_array_equals_local_and_survives_scancel",
    "tests/test_runner_resume.py::test_kill_9_at_random_points_then_rerun",  # ~90 s
    "tests/test_fidelity.py::test_torchrun_shards_equal_one_process",  # ~20 s
    "tests/test_runner_resume.py::test_torchrun_two_ranks_fill_the_same_store",  # ~17 s
)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # not an xdist worker: file order
        return
    first = [item for name in LONGEST_FIRST for item in items if item.nodeid == name]
    items[:] = first + [item for item in items if item not in first]
