"""The stage functions ``diffprobe run`` calls: each takes a :class:`StageContext` (the run
folder, this stage's folder, the spec's model and data, the folders of the stages it reads,
its shard) and its parameters (:mod:`diffprobe.stages.params`), calls the library function of
the matching command, and returns a small JSON summary for the run's provenance.

These are thin: the runner (``diffprobe.runner``) decides what runs where and when; the work
is in the functions called here, the same ones the single commands call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffprobe.errors import DiffprobeError
from diffprobe.io import write_json
from diffprobe.stages.params import (
    AlignParams,
    AnomaliesParams,
    AttributionParams,
    CaptureParams,
    DataSpec,
    DreamParams,
    ExtractParams,
    FeaturesAnalyseParams,
    FeaturesCaptureParams,
    HSpaceParams,
    LensParams,
    ModelSpec,
    NoParams,
    ReportParams,
    SAEEvalParams,
    SAETrainParams,
    SamplesParams,
    SitesParams,
    SteerParams,
)


class StageError(DiffprobeError):
    pass


SAE_SOURCE = "source.json"  # in an sae_train stage's folder: the run and site it trained on


@dataclass
class StageContext:
    """What a stage function gets besides its parameters."""

    root: Path
    """The run folder."""
    folder: Path
    """This stage's folder (``root / name``)."""
    model_spec: ModelSpec
    data: DataSpec
    inputs: dict[str, Path] = field(default_factory=dict)
    """Parameter name (``input``) -> folder of the stage it names."""
    shard: tuple[int, int] = (0, 1)
    progress: bool = True
    models: dict = field(default_factory=dict)
    """Models loaded in this process, reused by the next stage that needs the same."""

    def model(self) -> Any:
        from diffprobe.loading import load

        spec = self.model_spec
        key = (spec.name, spec.dtype, spec.device)
        if key not in self.models:
            self.models[key] = load(spec.name, dtype=spec.dtype, device=spec.device)
        return self.models[key]

    def things_root(self) -> Path:
        if self.data.shapes_things is not None:
            return self.root / "data"
        if self.data.things is not None:
            return Path(self.data.things).expanduser()
        raise StageError(
            "this stage needs THINGS triplets: set data.things (a THINGS root) or "
            "data.shapes_things in the spec"
        )

    def source_text(self, override: str | None = None) -> str:
        text = override or self.data.source
        if text is None or text == "things":
            if text is None and self.data.things is None and self.data.shapes_things is None:
                raise StageError(
                    "no items: set data.source (image folder, THINGS root, shapes:N) in the "
                    "spec, or data: on the extract stage"
                )
            return str(self.things_root())
        return text


# ----------------------------------------------------------------------------- preparation


def prepare_data(ctx: StageContext, params: NoParams) -> dict:
    """The ``data`` stage: export the shapes world in the THINGS layout where the spec asks."""
    from diffprobe.data.things_export import export_things

    spec = ctx.data.shapes_things
    if spec is None:
        return {"exported": False}
    export_things(ctx.folder, images_per_concept=spec.images_per_concept, n_train=spec.n_train,
                  n_test=spec.n_test, seed=spec.seed)  # fmt: skip
    return {"exported": True, "root": str(ctx.folder)}


def list_models(ctx: StageContext, params: NoParams) -> dict:
    from diffprobe.stages.demo import stage_models

    stage_models()
    return {}


def sites(ctx: StageContext, params: SitesParams) -> dict:
    from diffprobe.stages.demo import stage_sites

    ctx.folder.mkdir(parents=True, exist_ok=True)
    stage_sites(ctx.folder, params.model, params.size, params.components)
    return {}


def capture(ctx: StageContext, params: CaptureParams) -> dict:
    from diffprobe.stages.demo import stage_capture

    summary = stage_capture(ctx.folder, ctx.model(), params.sites, params.caption, params.steps,
                            params.guidance_scale, params.seed)  # fmt: skip
    return {site: entry["records"] for site, entry in summary.items()}


def samples(ctx: StageContext, params: SamplesParams) -> dict:
    from diffprobe.stages.demo import stage_grid

    path = stage_grid(ctx.folder, params.n, ctx.model(), params.steps, params.guidance_scale,
                      params.seed)  # fmt: skip
    return {"grid": str(path)}


# ----------------------------------------------------------------------------- extraction


def _plan(params: ExtractParams):
    from diffprobe.extract.plan import Condition, ExtractionPlan

    return ExtractionPlan(
        sites=list(params.sites), noise_levels=params.noise_levels, timesteps=params.timesteps,
        conditions=[Condition(**c.model_dump()) for c in params.conditions],
        pooling=params.pooling, seed=params.seed, image_size=params.image_size,
        chunk_items=params.chunk_items, store_dtype=params.store_dtype,
        batch_invariant=params.batch_invariant,
    )  # fmt: skip


def extract(ctx: StageContext, params: ExtractParams) -> dict:
    """One shard (``ctx.shard``) of the grid into the stage folder: chunk k of the store is
    this shard's when k % n == i; finished chunks are skipped."""
    from diffprobe.data.sources import open_source
    from diffprobe.extract import extract as run_extract
    from diffprobe.extract.store import done_chunks

    plan = _plan(params)
    source = open_source(ctx.source_text(params.data), ctx.data.on_error)
    before = done_chunks(ctx.folder)
    run_extract(ctx.model(), source, plan, ctx.folder, batch_size=params.batch_size,
                shard=ctx.shard, captions_file=params.captions,
                progress=ctx.progress)  # fmt: skip
    after = done_chunks(ctx.folder)
    index, count = ctx.shard
    mine = {k for k in after - before if k % count == index}  # not another shard's, beside us
    return {"chunks_computed": len(mine), "chunks_done": len(after)}


def extract_units(ctx: StageContext, params: ExtractParams) -> tuple[int | None, int]:
    """(chunks in all, chunks done) of an extract stage; None where the items are not known
    yet (data made by an earlier stage)."""
    from diffprobe.data.sources import open_source
    from diffprobe.extract.store import done_chunks

    done = len(done_chunks(ctx.folder))
    try:
        items = len(open_source(ctx.source_text(params.data), ctx.data.on_error))
    except DiffprobeError:
        return None, done
    return math.ceil(items / params.chunk_items), done


# ----------------------------------------------------------------------------- analyses


def align(ctx: StageContext, params: AlignParams) -> dict:
    """Odd-one-out alignment of the input run (``diffprobe align``), then the probes and
    regressions asked for, into the stage folder."""
    from diffprobe.data.things import load_things
    from diffprobe.extract.store import open_run
    from diffprobe.stages.align import align_run, write_outputs
    from diffprobe.stages.probing import probe_run, regress_run

    run_dir = ctx.inputs["input"]
    if params.best is not None:
        from diffprobe.stages.demo import alignment_demo

        study = alignment_demo(run_dir, ctx.things_root(), ctx.folder, folds=params.best.folds)
        return {"best": study["best"], "probe": study["probe"]["probed"],
                "regression_r2": study["regression"]["r2"]}  # fmt: skip
    run, things = open_run(run_dir), load_things(ctx.things_root())
    selection = {"sites": params.sites, "noises": params.noises, "conditions": params.conditions}
    result = align_run(run, things, triplets=params.triplets, metrics=list(params.metrics),
                       pca=params.pca, reductions=params.reductions, progress=ctx.progress,
                       **selection)  # fmt: skip
    write_outputs(result, ctx.folder, cka=params.cka)
    best = max(result.rows, key=lambda r: r["accuracy"])
    if params.probe is not None:
        p = params.probe
        probe_run(run, things, ctx.folder / "probe", triplets=p.triplets, reduction=p.reduction,
                  folds=p.folds, seed=p.seed, max_epochs=p.max_epochs, patience=p.patience,
                  progress=ctx.progress, **selection)  # fmt: skip
    if params.regress is not None:
        r = params.regress
        regress_run(run, things, ctx.folder / "regress", r.target, triplets=r.triplets,
                    reduction=r.reduction, folds=r.folds, metric=r.metric, seed=r.seed,
                    progress=ctx.progress, **selection)  # fmt: skip
    return {"best": best}


def anomalies(ctx: StageContext, params: AnomaliesParams) -> dict:
    """Every anomaly measurement of the input (unpooled) run (``diffprobe anomalies``)."""
    from diffprobe.stages.anomalies import AnomalyConfig, analyse_run, summary_lines

    config = AnomalyConfig(binnings=list(params.binnings), test_fraction=params.test_fraction,
                           threshold=params.threshold, group=params.group,
                           reference=params.reference, corner=params.corner,
                           corner_size=params.corner_size, seed=params.seed)  # fmt: skip
    model = ctx.model() if params.corner else None
    summary = analyse_run(ctx.inputs["input"], ctx.folder, config, sites=params.sites,
                          noises=params.noises, conditions=params.conditions, grid=params.grid,
                          model=model, batch_size=params.batch_size, plots=params.plots,
                          progress=ctx.progress)  # fmt: skip
    for line in summary_lines(summary):
        print("  " + line, flush=True)
    return {"sites": sorted({r["site"] for r in summary["position_probes"]})}


def lens(ctx: StageContext, params: LensParams) -> dict:
    """The Diffusion Lens grid of one prompt (``diffprobe lens``)."""
    from diffprobe.stages.lens import lens as run_lens

    result = run_lens(ctx.model(), params.prompt, layers=params.layers, seeds=params.seeds,
                      steps=params.steps, guidance_scale=params.guidance_scale,
                      encoder=params.encoder, padding=params.pad, norm=params.norm,
                      pooled=params.pooled, size=params.size, batch_size=params.batch_size,
                      progress=ctx.progress)  # fmt: skip
    result.save(ctx.folder)
    print(f"== diffusion lens: {len(result.layers)} layers x {len(result.seeds)} seeds -> "
          f"{ctx.folder / 'grid.png'}", flush=True)  # fmt: skip
    return {"layers": result.layers, "encoder": result.metadata.get("encoder")}


def sae_train(ctx: StageContext, params: SAETrainParams) -> dict:
    """A TopK SAE on the input run's tokens at one site (``diffprobe sae train``)."""
    from diffprobe.sae.sources import run_source
    from diffprobe.sae.train import TrainConfig, train_sae

    config = TrainConfig(expansion=params.expansion, k=params.k, lr=params.lr,
                         batch_size=params.batch_size, epochs=params.epochs,
                         tokens=params.tokens, normalization=params.normalization,
                         seed=params.seed)  # fmt: skip
    config.validate()
    source = run_source(ctx.inputs["input"], params.site, noise=params.noise,
                        condition=params.condition)  # fmt: skip
    sae = train_sae(source, ctx.folder, config=config, device=params.device,
                    progress=ctx.progress)  # fmt: skip
    write_json(ctx.folder / SAE_SOURCE, {"run": str(ctx.inputs["input"]), "site": params.site,
                                         "noise": params.noise,
                                         "condition": params.condition})  # fmt: skip
    return {"d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k}


def sae_eval(ctx: StageContext, params: SAEEvalParams) -> dict:
    """FVU, L0 and dead fraction of the input SAE on the run it was trained on."""
    import json

    from diffprobe.sae.evaluate import evaluate_sae
    from diffprobe.sae.formats import load_sae
    from diffprobe.sae.sources import run_source
    from diffprobe.sae.train import resolve_device

    folder = ctx.inputs["input"]
    sae = load_sae(folder, device=resolve_device(params.device))
    trained = json.loads((folder / SAE_SOURCE).read_text())
    source = run_source(trained["run"], trained["site"], noise=trained["noise"],
                        condition=trained["condition"])  # fmt: skip
    result = evaluate_sae(sae, source, tokens=params.tokens, batch_size=params.batch_size,
                          progress=ctx.progress)  # fmt: skip
    write_json(ctx.folder / "evaluation.json", result.as_dict())
    return {"fvu": result.fvu, "l0": result.l0, "dead_fraction": result.dead_fraction}


def report(ctx: StageContext, params: ReportParams) -> dict:
    """The HTML report of every stage of the run folder (``diffprobe report RUN``)."""
    from diffprobe.io import claim_output
    from diffprobe.report.build import write_report

    claim_output(ctx.folder, "report")
    path = write_report([ctx.root], ctx.folder / "report.html", overwrite=True,
                        title=params.title)  # fmt: skip
    return {"report": str(path)}


def features_capture(ctx: StageContext, params: FeaturesCaptureParams) -> dict:
    """One shard of the activity capture during generation (``diffprobe features capture``)."""
    from diffprobe.features import ActivityPlan, capture_activity

    prompts = params.prompts or ctx.data.prompts
    if prompts is None:
        raise StageError("features_capture needs prompts: set prompts: (a prompt file or "
                         "shapes:N) on the stage, or data.prompts")  # fmt: skip
    plan = ActivityPlan(sites=list(params.sites), seeds=list(params.seeds), steps=params.steps,
                        guidance_scale=params.guidance_scale,
                        negative_prompt=params.negative_prompt,
                        reductions=tuple(params.reductions), branches=params.branches,
                        size=params.size, chunk_items=params.chunk_items,
                        store_dtype=params.store_dtype)  # fmt: skip
    capture_activity(ctx.model(), prompts, plan, ctx.folder, batch_size=params.batch_size,
                     shard=ctx.shard, progress=ctx.progress)  # fmt: skip
    return {}


def features_analyse(ctx: StageContext, params: FeaturesAnalyseParams) -> dict:
    """The timestep analysis of a features_capture stage (``diffprobe features analyse``)."""
    from diffprobe.features import analyse_activity

    analyse_activity(ctx.inputs["input"], ctx.folder, sites=params.sites, branch=params.branch,
                     top_k=params.top_k, examples=params.examples,
                     windows=[tuple(w) for w in params.windows], profile=params.profile,
                     threshold=params.threshold, peak_height=params.peak_height,
                     peak_distance=params.peak_distance, peak_count=params.peak_count,
                     plot_channels=params.plot_channels)  # fmt: skip
    return {}


def dream(ctx: StageContext, params: DreamParams) -> dict:
    """Deep dream of channels or SAE latents at a site (``diffprobe dream``)."""
    from diffprobe.stages.dream import DreamSettings, dream_targets

    sae, sae_path = None, None
    if params.sae is not None:
        from diffprobe.sae.formats import load_sae

        sae_path = str(ctx.inputs["sae"])
        sae = load_sae(sae_path)
    settings = DreamSettings(steps=params.steps, lr=params.lr, tv=params.tv,
                             renoise=params.renoise, spectral=params.spectral,
                             prompt=params.prompt)  # fmt: skip
    dream_targets(ctx.model(), params.site, list(params.targets),
                  {t: list(params.timesteps) for t in params.targets}, list(params.seeds),
                  ctx.folder, sae=sae, settings=settings, batch_size=params.batch_size,
                  size=params.size, progress=ctx.progress, sae_path=sae_path)  # fmt: skip
    return {}


def attribution(ctx: StageContext, params: AttributionParams) -> dict:
    """Per-word attribution maps of generated prompts (``diffprobe attribution``)."""
    from diffprobe.stages.attribution_run import run_attribution

    prompts = list(params.prompts)
    folder = run_attribution(ctx.model(), prompts, ctx.folder, words=params.words,
                             seeds=[params.seed + i for i in range(len(prompts))],
                             steps=params.steps, guidance_scale=params.guidance_scale,
                             size=params.size, layers=params.layers,
                             timesteps=params.timesteps, store=params.store,
                             masks=params.masks, threshold=params.threshold,
                             progress=ctx.progress)  # fmt: skip
    return {"folder": str(folder)}


def steer(ctx: StageContext, params: SteerParams) -> dict:
    """Steered generations, one folder per channel plus the baseline (``diffprobe steer``)."""
    from diffprobe.features import Analysis
    from diffprobe.stages.features import prior_settings, resolve_steer, steer_to_folder

    prompts, seeds, guidance = list(params.prompts), list(params.seeds), params.guidance_scale
    strength, relative = params.strength, params.relative
    if params.prior:
        if prompts != [""] or guidance not in (None, 1.0):
            raise StageError("steer with prior: true steers the empty prompt without CFG: leave "
                             "out prompts and guidance_scale")  # fmt: skip
        prompts, seeds, guidance, relative = prior_settings(strength, relative)
    model = ctx.model()
    analysis = Analysis(ctx.inputs["input"]) if params.input is not None else None
    steers = [resolve_steer(model, params.site, channel=c, mode=params.mode, strength=strength,
                            relative=relative, window=params.window, analysis=analysis,
                            branch=params.branch)
              for c in params.channels]  # fmt: skip
    steer_to_folder(model, steers, ctx.folder, prompts=prompts, seeds=seeds, steps=params.steps,
                    guidance_scale=guidance, size=params.size, prior=params.prior,
                    overwrite=True, progress=ctx.progress)  # fmt: skip
    return {}


def hspace(ctx: StageContext, params: HSpaceParams) -> dict:
    """Learn (or compute) a Δh and evaluate it over the strength sweep (``diffprobe hspace``):
    ``delta/`` holds the Δh, ``eval/`` the metrics, edit grid and curves."""
    from diffprobe.stages import hspace as stage

    model = ctx.model()
    delta = ctx.folder / "delta"
    if params.method in ("mean-difference", "pca"):
        stage.make_direction(model, delta, source=params.source, target=params.target,
                             method=params.method, items=params.items, steps=params.steps,
                             seed=params.seed, progress=ctx.progress, overwrite=True)  # fmt: skip
    else:
        stage.train(model, delta, source=params.source, target=params.target,
                    kind=params.method, items=params.items, clip=params.clip, seed=params.seed,
                    progress=ctx.progress, overwrite=True)  # fmt: skip
    metrics = stage.evaluate(model, [delta / "delta.safetensors"], ctx.folder / "eval",
                             source=params.source, target=params.target,
                             strengths=params.strengths, items=params.eval_items,
                             steps=params.steps, clip=params.clip, seed=params.seed,
                             progress=ctx.progress, overwrite=True)  # fmt: skip
    return {"eval": str(ctx.folder / "eval"), "metrics_keys": sorted(metrics)[:10]}
