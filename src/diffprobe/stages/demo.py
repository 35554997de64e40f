"""``make demo``: the main job on the embedded default (`tiny` and the shapes world).

Each stage writes into its folder of the demo folder (``runs/demo``) and prints a short summary:
the models, SD 1.5's sites (meta device), a capture on `tiny`, a captioned image grid, an
extraction grid over the shapes world in the THINGS layout, its alignment (``grid_run/alignment``,
where ``diffprobe align`` writes too), the anomalies of unpooled features and a Diffusion Lens
grid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffprobe.analysis import probing
from diffprobe.analysis.alignment import CHANCE, restrict_triplets
from diffprobe.data import shapes
from diffprobe.data.sources import open_source
from diffprobe.data.things import load_things
from diffprobe.data.things_export import SHAPES_FACTOR_NAMES, export_things, shapes_factor_embedding
from diffprobe.extract import extract
from diffprobe.extract.plan import Condition, ExtractionPlan
from diffprobe.extract.store import open_run
from diffprobe.hooks.engine import capture
from diffprobe.io import atomic_path, claim_output, write_csv, write_json
from diffprobe.loading import load
from diffprobe.models.meta import site_shapes
from diffprobe.registry import list_models
from diffprobe.report.figures import new_figure, save_figure
from diffprobe.stages.align import _columns, align_run, summary_table, write_outputs
from diffprobe.stages.anomalies import ANOMALIES_KIND, AnomalyError, analyse_run, summary_lines

log = logging.getLogger(__name__)

DEMO_KIND = "demo"

CAPTURE_SITES = [
    "unet.down_blocks.0",
    "unet.down_blocks.1",
    "unet.mid_block",
    "unet.up_blocks.0",
    "unet.up_blocks.1.attentions.0",
    "text_encoder.encoder.layers.1",
]


def _print(text: str = "") -> None:
    print(text, flush=True)


def stage_models() -> None:
    _print("== models ==")
    for spec in list_models():
        _print(f"  {spec.alias:<14} {spec.family:<5} {spec.resolution:>5} px  {spec.description}")


def stage_sites(
    out: Path, model: str = "sd1.5", size: int = 512, components: Sequence[str] = ("unet",)
) -> None:
    _print(f"== sites of {model} at {size} px (meta device, no weights) ==")
    found = site_shapes(model, size, list(components))
    blocks = [s for s in found.values() if s.site.count(".") == 2 or s.site == "unet.mid_block"]
    for s in blocks:
        _print(f"  {s.site:<22} {tuple(s.shape)}")
    write_json(out / f"sites_{model}_{size}.json", {s.site: list(s.shape) for s in found.values()})


def stage_capture(
    out: Path,
    model: Any = "tiny",
    sites: Sequence[str] = tuple(CAPTURE_SITES),
    caption: str = "a small red circle in the top left",
    steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
) -> dict:
    model = load(model) if isinstance(model, (str, Path)) else model
    _print(f"== capture on {model.name} ==")
    with capture(model, list(sites)) as cache:
        images = model.generate(caption, steps=steps, guidance_scale=guidance_scale, seed=seed)
    summary = {}
    for site in sites:
        records = cache.records(site)
        value = records[-1].value
        summary[site] = {
            "records": len(records),
            "shape_per_record": list(value.shape),
            "branches": sorted({r.branch for r in records}),
        }
        _print(f"  {site:<32} {len(records):>3} records of {tuple(value.shape)}")
    write_json(out / "capture.json", summary)
    _save_image(images[0], out / "tiny_sample.png")
    _print(f"  image for {caption!r} -> {out / 'tiny_sample.png'}")
    return summary


def _save_image(image, path: Path) -> None:
    from PIL import Image

    array = (torch.as_tensor(image).clamp(0, 1).numpy() * 255).round().astype("uint8")
    with atomic_path(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")


def stage_grid(
    out: Path,
    n: int = 16,
    model: Any = "tiny",
    steps: int = 25,
    guidance_scale: float = 5.0,
    seed: int = 0,
) -> Path:
    """A captioned grid of `tiny` images for held-out captions."""
    model = load(model) if isinstance(model, (str, Path)) else model
    _print(f"== {model.name}: generated images for held-out captions ==")
    heldout = shapes.sample(n, seed=0, split="heldout")
    images = model.generate(list(heldout.captions), steps=steps, guidance_scale=guidance_scale,
                            seed=seed)  # fmt: skip
    images = torch.as_tensor(images).clamp(0, 1).numpy()
    columns = min(4, n)
    rows = -(-n // columns)
    figure = new_figure(figsize=(columns * 2.6, rows * 2.9 + 0.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False))
    for axis, image, caption in zip(list(axes.flat)[:n], images, heldout.captions, strict=True):
        axis.imshow(image, interpolation="nearest")
        axis.set_title("\n".join(_wrap(caption, 26)), fontsize=7)
        axis.axis("off")
    for axis in list(axes.flat)[n:]:
        axis.axis("off")
    figure.suptitle(f"{model.name}, held-out captions ({steps} steps, guidance "
                    f"{guidance_scale:g}, seed {seed})", fontsize=9)  # fmt: skip
    path = save_figure(figure, out / "tiny_grid.png", dpi=110)
    _print(f"  {n} images -> {path}")
    return path


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


DEMO_GRID_SITES = [
    "unet.down_blocks.0",
    "unet.down_blocks.1",
    "unet.down_blocks.2",
    "unet.mid_block",
    "unet.up_blocks.0",
    "unet.up_blocks.1",
    "unet.up_blocks.2",
    "unet.up_blocks.1.attentions.0",
    "unet.up_blocks.2.attentions.0",
]
DEMO_NOISE = [0.02, 0.1, 0.2, 0.3, 0.5, 0.7]
# The conditioning axis of the alignment study: the empty prompt (what the image alone evokes)
# and the concept's label as the prompt ("a red circle"). Keyword arguments of
# diffprobe.extract.engine.Condition.
DEMO_CONDITIONS = [
    {"name": "empty"},
    {"name": "label", "kind": "template", "template": "a {label}"},
]


def stage_extract(out: Path, progress: bool) -> tuple[Path, Path]:
    """An extraction grid on the shapes world (THINGS layout) with `tiny`."""
    _print("== extraction grid: tiny x shapes world (THINGS layout) ==")
    things_root = out / "shapes_things-12"  # the configuration of benchmarks/alignment_tiny.py
    if not (things_root / "things_concepts.tsv").exists():
        export_things(things_root, images_per_concept=12, n_train=36_000, n_test=4_000)
    model = load("tiny")
    source = open_source(str(things_root))
    plan = ExtractionPlan(sites=DEMO_GRID_SITES, noise_levels=DEMO_NOISE, pooling="mean",
                          conditions=[Condition(**c) for c in DEMO_CONDITIONS])  # fmt: skip
    run_dir = extract(model, source, plan, out / "grid_run", batch_size=64, overwrite=True,
                      progress=progress)  # fmt: skip
    run = open_run(run_dir)
    first = run.get(DEMO_GRID_SITES[0], DEMO_NOISE[0])
    _print(
        f"  {len(source)} images x {len(DEMO_GRID_SITES)} sites x {len(DEMO_NOISE)} noise levels "
        f"x {len(DEMO_CONDITIONS)} conditions ({', '.join(run.conditions)}) -> {run_dir} "
        f"(e.g. {DEMO_GRID_SITES[0]} {first.shape})"
    )
    return run_dir, things_root


def stage_alignment(run_dir: Path, things_root: Path) -> dict:
    """Odd-one-out accuracy, probe and regression on the shapes world, in the run's
    ``alignment`` folder (where ``diffprobe align RUN`` writes too)."""
    _print("== alignment: odd-one-out on the shapes world ==")
    return alignment_demo(run_dir, things_root, Path(run_dir) / "alignment", folds=5)


def stage_anomalies(out: Path) -> dict:
    """Position probes, corner ratios, high-norm tokens on `tiny`."""
    return anomalies_demo("tiny", out / "anomalies", items=64)


def stage_lens(out: Path) -> dict:
    """A Diffusion Lens grid for one caption."""
    from diffprobe.stages.lens import demo

    _print("== Diffusion Lens on tiny ==")
    return demo("tiny", out / "lens")


def run_demo(out: Path, progress: bool = True) -> None:
    """Every stage into the demo folder ``out`` (claimed: new, empty or an earlier demo)."""
    out = claim_output(out, DEMO_KIND)
    began = time.perf_counter()
    stage_models()
    stage_sites(out)
    stage_capture(out)
    stage_grid(out)
    run_dir, things_root = stage_extract(out, progress)
    stage_alignment(run_dir, things_root)
    stage_anomalies(out)
    stage_lens(out)
    _print(f"demo outputs in {out}/ ({time.perf_counter() - began:.0f} s)")


# ------------------------------------------------------------------ the alignment stage


def alignment_demo(run_dir: Path, things_root: Path, out: Path, *, folds: int = 3) -> dict:
    """``make demo`` stage: alignment of a run over a THINGS-layout export of the shapes world.

    Writes ``alignment.csv``, ``accuracy_heatmap.png``, ``accuracy_vs_noise.png`` (and the CKA
    heatmap) into ``out``, then on the best (site, noise, condition) a linear probe and a ridge
    regression onto the true factors, ``folds`` folds over objects each, and the regression from
    the best (site, noise) of each condition; prints a short table and returns the numbers
    (``benchmarks/alignment_tiny.py`` runs the same and keeps them as JSON).
    """
    run = open_run(run_dir)
    things = load_things(things_root)
    result = align_run(run, things, triplets="test", progress=False)
    paths = write_outputs(result, out)
    out = Path(out)
    best = max(result.rows, key=lambda r: r["accuracy"])
    covered = result.covered
    train = restrict_triplets(things.get_triplets("train"), covered)

    def features_of(row: dict) -> np.ndarray:
        key = ("", row["site"], row["noise"], row["condition"], row["reduction"])
        return result.features[key].astype(np.float64)

    def probe_on(row: dict):
        return probing.probe(features_of(row), train, folds=folds, max_epochs=200, patience=40,
                             seed=0)  # fmt: skip

    probe_result = probe_on(best)
    factors = shapes_factor_embedding(things.concepts)[covered]

    def regress_on(row: dict):
        return probing.regress(
            features_of(row),
            factors,
            folds=folds,
            triplets=result.triplets,
            metric="euclidean",
            target_names=SHAPES_FACTOR_NAMES,
            seed=0,
        )

    regression = regress_on(best)
    # the best (site, noise level) of each condition, and the factors' regression from it: with
    # more than one condition this shows what the conditioning (e.g. the label prompt) adds
    by_condition = {}
    for condition in dict.fromkeys(r["condition"] for r in result.rows):
        top = max(
            (r for r in result.rows if r["condition"] == condition), key=lambda r: r["accuracy"]
        )
        fit = regression if top is best else regress_on(top)
        probed = probe_result if top is best else probe_on(top)
        by_condition[condition] = {
            "site": top["site"], "noise": top["noise"], "accuracy": top["accuracy"],
            "normalised": top["normalised"], "r2": fit.r2_mean, "r2_std": fit.r2_std,
            "r2_by_factor": fit.r2_by_target, "ooo": fit.ooo_mean,
            "probe_zero_shot": probed.zero_shot_mean, "probed": probed.probed_mean,
            "probed_std": probed.probed_std,
            "folds_improved": sum(r["probed"] > r["zero_shot"] for r in probed.rows),
        }  # fmt: skip
    reductions_rows = []
    if run.info.get("pooling") == "none":
        compared = align_run(
            run,
            things,
            triplets="test",
            reductions=["mean", "max", "flatten", "pca-8"],
            progress=False,
        )
        reductions_rows = [
            r
            for r in compared.rows
            if r["site"] == best["site"]
            and r["noise"] == best["noise"]
            and r["condition"] == best["condition"]
        ]
        write_csv(out / "reductions.csv", reductions_rows, _columns(reductions_rows))
    write_csv(out / "probe.csv", probe_result.rows)
    write_csv(out / "regression.csv", regression.rows)

    print("== alignment (THINGS odd-one-out on the shapes world) ==")
    print(summary_table(result.rows, limit=8))
    ceiling_text = f"{things.ceiling:.3f}" if things.ceiling is not None else "unknown"
    print(
        f"chance {CHANCE:.3f}  noise ceiling {ceiling_text}  "
        f"({len(result.triplets)} test triplets, {int(covered.sum())} concepts)"
    )
    print(
        f"best: {best['site']} at {best['noise']} ({best['condition']}, {best['reduction']}): "
        f"accuracy {best['accuracy']:.3f}, normalised {best['normalised']:.3f}"
    )
    print(
        f"probe ({folds} folds over objects): zero-shot {probe_result.zero_shot_mean:.3f} -> probed "
        f"{probe_result.probed_mean:.3f} ± {probe_result.probed_std:.3f}"
    )
    by_factor = ", ".join(f"{k} {v:.2f}" for k, v in regression.r2_by_target.items())
    print(
        f"regression onto the true factors: R² {regression.r2_mean:.3f} ± {regression.r2_std:.3f} "
        f"({by_factor}), OOO of the prediction {regression.ooo_mean:.3f}"
    )
    if len(by_condition) > 1:
        for condition, top in by_condition.items():
            factor_r2 = ", ".join(f"{k} {v:.2f}" for k, v in top["r2_by_factor"].items())
            print(
                f"  best with condition {condition}: {top['site']} at {top['noise']}, accuracy "
                f"{top['accuracy']:.3f}; probe {top['probe_zero_shot']:.3f} -> {top['probed']:.3f} "
                f"(better in {top['folds_improved']} of {folds} folds); factors R² {top['r2']:.3f} "
                f"({factor_r2})"
            )
    for row in reductions_rows:
        print(f"  reduction {row['reduction']:<8} accuracy {row['accuracy']:.3f}")
    return {
        "rows": result.rows,
        "best": best,
        "best_by_condition": by_condition,
        "ceiling": things.ceiling,
        "probe": {
            "zero_shot": probe_result.zero_shot_mean,
            "probed": probe_result.probed_mean,
            "probed_std": probe_result.probed_std,
            "folds": probe_result.rows,
        },
        "regression": {
            "r2": regression.r2_mean,
            "r2_std": regression.r2_std,
            "r2_by_factor": regression.r2_by_target,
            "ooo": regression.ooo_mean,
            "folds": regression.rows,
        },
        "reductions": reductions_rows,
        "paths": {k: str(v) for k, v in paths.items()},
    }


# ------------------------------------------------------------------ the anomaly stage


ANOMALY_SITES = (
    "unet.down_blocks.0",
    "unet.down_blocks.1",
    "unet.mid_block",
    "unet.up_blocks.1",
    "unet.up_blocks.2",
)


def anomalies_demo(
    model: str | Path | Any = "tiny",
    out: str | Path = Path("runs/demo/anomalies"),
    items: int = 64,
    *,
    sites: Sequence[str] | None = None,
    noise_level: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """``make demo``: anomalies of ``model`` on ``items`` shapes-world images.

    Extracts unpooled features at ``sites`` (default: those of :data:`ANOMALY_SITES` the model has)
    at ``noise_level`` with the empty prompt into ``out/run``, then runs :func:`analyse_run`
    (position probes, corner ratios with the cropped images, high-norm counts, similarity maps)
    into ``out``, prints a short table and returns the numbers per site:
    ``{"sites": {site: {"grid", "row_exact", "col_exact", "row_chance", "col_chance",
    "corner_ratio", "high_norm_groups", "probes": {...}}}, "out": str}``."""
    out = Path(out)
    loaded = load(model) if isinstance(model, (str, Path)) else model
    available = set(loaded.site_names(loaded.denoiser_name))
    chosen = list(sites) if sites is not None else [s for s in ANOMALY_SITES if s in available]
    skipped = [s for s in (sites or ANOMALY_SITES) if s not in available]
    if sites is not None and skipped:
        raise AnomalyError(
            f"sites {skipped} are not in {loaded.name}; `diffprobe sites MODEL` lists them"
        )
    if skipped:
        log.info("demo sites not in %s: %s", loaded.name, ", ".join(skipped))
    print(
        f"== anomalies on {loaded.name}: {items} shapes-world items, noise level {noise_level} ==",
        flush=True,
    )
    plan = ExtractionPlan(
        sites=chosen,
        noise_levels=[noise_level],
        pooling="none",
        seed=seed,
        chunk_items=max(items, 1),
    )
    claim_output(out, ANOMALIES_KIND, entries=("run",))
    root = extract(loaded, open_source(f"shapes:{items}:{seed}"), plan, out / "run",
                   overwrite=True, progress=progress)  # fmt: skip
    summary = analyse_run(root, out, model=loaded, seed=seed, progress=progress)
    for line in summary_lines(summary):
        print("  " + line, flush=True)
    print(f"  tables and plots in {out}/", flush=True)
    numbers: dict[str, dict] = {}
    for r in summary["position_probes"]:
        entry = numbers.setdefault(r["site"], {"grid": r["grid"], "probes": {}})
        entry["probes"][f"{r['axis']}_{r['binning']}"] = {
            "accuracy": r["accuracy"],
            "chance": r["chance"],
        }
        if r["binning"] == "exact":
            entry[f"{r['axis']}_exact"] = r["accuracy"]
            entry[f"{r['axis']}_chance"] = r["chance"]
    for r in summary["corner_ratio"]:
        numbers[r["site"]]["corner_ratio"] = r["ratio"]
    for r in summary["high_norm"]:
        numbers[r["site"]]["high_norm_groups"] = r["detections"]
        numbers[r["site"]]["images_with_high_norm"] = r["images_with_detections"]
    return {"sites": numbers, "out": str(out), "items": items, "noise_level": noise_level}
