"""Feature stages: the timestep analysis of an activity run (tables, JSON, CSV, plots) and the
steering runs (``diffprobe steer``, ``--prior``) that read it.

Analysis folder (``diffprobe features analyse RUN --out OUT``)::

    OUT/
      analysis.json           parameters, timesteps, grid, what each table means
      activity.zarr/<site>/<branch>/{mean,max,frequency}   (channels, timesteps)
      activity.zarr/<site>/<branch>/profile                (channels, grid points)
      activity.zarr/<site>/<branch>/top_items              (channels, timesteps, k) per timestep
      active_timesteps.json   {site: {channel: [[start, end], ...]}} inclusive grid ranges
      activity_peaks.json     {site: {channel: [{"timestep", "height"}, ...]}}
      top_examples.json       {site: {channel: {"overall" | "t<low>-<high>": [examples]}}}
      top_examples.csv        one row per (site, channel, window, rank)
      channels.csv            one row per (site, channel): max activation, peaks, active span
      plots/                  heatmap, profiles and top-example grids of the plotted channels
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffprobe.analysis import activity as act
from diffprobe.errors import DiffprobeError
from diffprobe.extract.generation import ActivityRun, open_activity
from diffprobe.extract.store import site_key
from diffprobe.io import check_output, claim_output, versions, write_bytes, write_csv, write_json

log = logging.getLogger(__name__)

ANALYSIS_KIND = "features-analysis"
STEER_KIND = "steer"
PROFILES = ("frequency", "mean", "max")


class FeaturesError(DiffprobeError):
    pass


def _ranges(values: np.ndarray) -> list[list[int]]:
    """Sorted integers -> inclusive [start, end] runs."""
    if len(values) == 0:
        return []
    breaks = np.flatnonzero(np.diff(values) != 1)
    starts = np.r_[values[0], values[breaks + 1]]
    ends = np.r_[values[breaks], values[-1]]
    return [[int(s), int(e)] for s, e in zip(starts, ends, strict=True)]


def _low_high(word: str) -> tuple[float, float] | None:
    """``"LOW-HIGH"`` -> (LOW, HIGH) as given (not checked for order); None when ``word`` is not
    two numbers joined by '-'."""
    low, sep, high = word.partition("-")
    try:
        return (float(low), float(high)) if sep else None
    except ValueError:
        return None


def parse_windows(text: str | None) -> list[tuple[float, float]]:
    """``"0-300,300-700"`` -> [(0, 300), (300, 700)]."""
    if not text:
        return []
    windows = []
    for word in text.replace(" ", "").split(","):
        window = _low_high(word)
        if window is None:
            raise FeaturesError(
                f"--windows {text!r}: {word!r} is not LOW-HIGH; give timestep ranges such as "
                "0-300,300-700"
            )
        if window[0] > window[1]:
            raise FeaturesError(f"--windows {text!r}: {word!r} is not LOW-HIGH with LOW <= HIGH")
        windows.append(window)
    return windows


def _zarr_files(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    import zarr

    files: dict = {}
    store = zarr.storage.MemoryStore(files)
    group = zarr.create_group(store, zarr_format=3)
    for path, values in arrays.items():
        group.create_array(path, data=np.ascontiguousarray(values), compressors=None)
    return {key: buffer.to_bytes() for key, buffer in files.items()}


def analyse_activity(
    run: str | Path | ActivityRun,
    out: str | Path,
    *,
    sites: Sequence[str] | None = None,
    branch: str | None = None,
    top_k: int = 20,
    examples: int = 9,
    windows: Sequence[tuple[float, float]] = (),
    profile: str = "frequency",
    threshold: float = 0.0,
    peak_height: float = 0.0,
    peak_distance: int = 100,
    peak_count: int = 3,
    grid_end: int | None = None,
    plot_channels: int = 8,
    overwrite: bool = False,
) -> Path:
    """Analyse an activity run (module docstring); returns ``out``. ``profile`` picks the table
    whose interpolation gives active timesteps and peaks: ``frequency`` (the thesis' top-k
    frequency), ``mean`` or ``max``; ``plot_channels`` plots that many channels per site (those
    with the highest max activation)."""
    run = run if isinstance(run, ActivityRun) else open_activity(run)
    if profile not in PROFILES:
        raise FeaturesError(f"--profile {profile!r}: expected one of {', '.join(PROFILES)}")
    for name, value in (("--top-k", top_k), ("--examples", examples),
                        ("--peak-distance", peak_distance), ("--peak-count", peak_count)):  # fmt: skip
        if value < 1:
            raise FeaturesError(f"{name} {value}: at least 1")
    sites = list(sites or run.sites)
    for site in sites:
        if site not in run.sites:
            raise FeaturesError(
                f"site '{site}' is not in {run.root}; it has {', '.join(run.sites)}"
            )
    branch = branch or run.default_branch()
    if branch not in run.branches:
        raise FeaturesError(f"--branch {branch!r}: {run.root} has {', '.join(run.branches)}")
    timesteps = run.timesteps
    grid_end = int(grid_end or run.info["schedule"].get("num_train_timesteps") or 1000)
    for low, high in windows:
        if not act.window_mask(timesteps, (low, high)).any():
            raise FeaturesError(
                f"--windows {low:g}-{high:g} holds none of the run's timesteps "
                f"({timesteps.min():g}..{timesteps.max():g})"
            )
    check_output(out, ANALYSIS_KIND, overwrite=overwrite)
    if not run.complete:
        raise FeaturesError(
            f"activity run {run.root} is incomplete; run the same capture command again to "
            "finish it"
        )
    out = claim_output(out, ANALYSIS_KIND, overwrite=overwrite)

    arrays, active_json, peaks_json, top_json = {}, {}, {}, {}
    top_rows, channel_rows, plots = [], [], []
    for site in sites:
        values = run.get(site, branch)  # (items, timesteps, channels)
        stats = act.timestep_stats(values)
        tables = {**stats, "frequency": act.topk_frequency(values, top_k)}
        if "max" in run.reductions:
            tables["spatial_max"] = act.timestep_stats(run.get(site, branch, "max"))["max"]
        grid, prof = act.interpolate_profile(tables[profile], timesteps, grid_end)
        active = act.active_timesteps(prof, grid, threshold)
        peaks = act.activity_peaks(prof, grid, peak_height, peak_distance, peak_count)
        per_t = np.stack(
            [act.top_examples(values[:, t], examples)[0] for t in range(len(timesteps))], 1
        )
        key = f"{site_key(site)}/{branch}"
        arrays.update({f"{key}/{name}": table for name, table in tables.items()})
        arrays[f"{key}/profile"] = prof.astype(np.float32)
        arrays[f"{key}/top_items"] = per_t.astype(np.int64)
        active_json[site] = {str(c): _ranges(a) for c, a in enumerate(active)}
        peaks_json[site] = {str(c): p for c, p in enumerate(peaks)}
        scored = {"overall": None, **{f"t{lo:g}-{hi:g}": (lo, hi) for lo, hi in windows}}
        top_json[site] = {}
        for name, window in scored.items():
            index, score = act.top_examples(act.window_score(values, timesteps, window), examples)
            for c in range(values.shape[2]):
                listed = [
                    {"rank": r, "item": int(i), "prompt": run.items[i]["prompt"],
                     "seed": run.items[i]["seed"], "value": float(v),
                     "image": run.items[i]["image"]}
                    for r, (i, v) in enumerate(zip(index[c], score[c], strict=True))
                ]  # fmt: skip
                top_json[site].setdefault(str(c), {})[name] = listed
                top_rows += [{"site": site, "branch": branch, "channel": c, "window": name,
                              **row} for row in listed]  # fmt: skip
        for c in range(values.shape[2]):
            span = active[c]
            channel_rows.append({
                "site": site, "branch": branch, "channel": c,
                "max_activation": float(stats["max"][c].max()),
                "mean_activation": float(stats["mean"][c].mean()),
                "peak_timesteps": " ".join(str(p["timestep"]) for p in peaks[c]),
                "active_from": int(span.min()) if len(span) else "",
                "active_to": int(span.max()) if len(span) else "",
            })  # fmt: skip
        order = np.argsort(-stats["max"].max(1), kind="stable")[:plot_channels]
        plots.append((site, values, tables, grid, prof, peaks, top_json[site], order))

    for path, data in _zarr_files(arrays).items():
        write_bytes(out / "activity.zarr" / path, data)
    write_json(out / "active_timesteps.json", active_json)
    write_json(out / "activity_peaks.json", peaks_json)
    write_json(out / "top_examples.json", top_json)
    write_csv(out / "top_examples.csv", top_rows)
    write_csv(out / "channels.csv", channel_rows)
    write_json(out / "analysis.json", {
        "run": str(Path(run.root).resolve()), "sites": sites, "branch": branch,
        "timesteps": timesteps.tolist(), "grid_end": grid_end, "top_k": top_k,
        "examples": examples, "windows": [list(w) for w in windows], "profile": profile,
        "threshold": threshold,
        "peaks": {"height": peak_height, "distance": peak_distance, "count": peak_count,
                  "plateau_size": 1},
        "tables": {
            "mean": "mean over items of the stored activity (spatial/token mean)",
            "max": "max over items of the stored activity (the thesis' max_activation)",
            "frequency": f"fraction of items with the channel among their top-{top_k} channels",
            "spatial_max": "max over items of the spatial/token max (with --reduce mean,max)",
            "profile": f"{profile} interpolated onto 0..{grid_end}",
            "top_items": f"per channel and stored timestep the {examples} highest items",
        },
        "versions": versions(),
    })  # fmt: skip
    _plot(out, run, plots, profile)
    return out


def _plot(out: Path, run: ActivityRun, plots: list, profile: str) -> None:
    from diffprobe.report.features import examples_figure, heatmap_figure, profile_figure
    from diffprobe.report.figures import save_figure

    timesteps = run.timesteps
    for site, _values, tables, grid, prof, peaks, tops, order in plots:
        folder = out / "plots" / site_key(site)
        save_figure(heatmap_figure(tables[profile], timesteps, site=site, measure=profile),
                    folder / "heatmap.png")  # fmt: skip
        for c in order:
            figure = profile_figure(grid, prof[c], timesteps, tables[profile][c], peaks[c],
                                    site=site, channel=int(c), measure=profile,
                                    max_activation=tables["max"][c])  # fmt: skip
            save_figure(figure, folder / f"profile_c{c:05d}.png")
            listed = tops[str(c)]["overall"]
            images = run.images([row["item"] for row in listed])
            captions = [f"{row['prompt'][:28]}\nseed {row['seed']}  {row['value']:.3g}"
                        for row in listed]  # fmt: skip
            figure = examples_figure(images, captions,
                                     title=f"{site} channel {c}: top examples (overall)")  # fmt: skip
            save_figure(figure, folder / f"top_c{c:05d}.png")


# -- reading an analysis ------------------------------------------------------------------------


class Analysis:
    """Reader of an analysis folder: the tables steering needs."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / "analysis.json"
        if not path.is_file():
            raise FeaturesError(
                f"--analysis {root}: no analysis.json; pass a folder written by diffprobe "
                "features analyse"
            )
        self.info = json.loads(path.read_text(encoding="utf-8"))
        self.timesteps = np.asarray(self.info["timesteps"], dtype=np.float64)

    def table(self, site: str, name: str) -> np.ndarray:
        import zarr

        if site not in self.info["sites"]:
            raise FeaturesError(
                f"site '{site}' is not in the analysis {self.root}; it has "
                f"{', '.join(self.info['sites'])}"
            )
        group = zarr.open_group(str(self.root / "activity.zarr"), mode="r", zarr_format=3)
        return np.asarray(group[f"{site_key(site)}/{self.info['branch']}/{name}"][...])

    def channels(self, site: str) -> int:
        return int(self.table(site, "max").shape[0])

    def active(self, site: str, channel: int) -> list[list[int]]:
        found = json.loads((self.root / "active_timesteps.json").read_text())
        return found[site][str(channel)]

    def peaks(self, site: str, channel: int) -> list[dict]:
        found = json.loads((self.root / "activity_peaks.json").read_text())
        return found[site][str(channel)]


# -- steering -----------------------------------------------------------------------------------


def resolve_steer(
    model,
    site: str,
    *,
    channel: int | None = None,
    direction=None,
    mode: str = "add",
    strength: float | None = None,
    relative: float | None = None,
    window: str = "all",
    analysis: Analysis | None = None,
    branch: str | None = None,
    mask=None,
):
    """The :class:`~diffprobe.interventions.steer.Steer` a command line asks for: ``window``
    is ``all``, ``active`` / ``peaks`` (from ``analysis``) or ``LOW-HIGH`` in timesteps;
    ``relative`` gives the strength as that multiple of the channel's max activation at each
    timestep (from ``analysis``), ``strength`` an absolute one."""
    from diffprobe.hooks.edits import TimestepProfile, TimestepSet, TimestepWindow
    from diffprobe.hooks.sites import parse_site
    from diffprobe.interventions.steer import Steer

    if parse_site(site).component != model.denoiser_name:
        raise FeaturesError(
            f"--site {site}: steering acts on denoiser sites ('{model.denoiser_name}.…')"
        )
    model.module(site)  # unknown sites: one line with a did-you-mean
    if (strength is None) == (relative is None):
        raise FeaturesError("give --strength (absolute) or --relative (× max activation), one")
    needs = relative is not None or window in ("active", "peaks")
    if needs and analysis is None:
        raise FeaturesError(
            f"--window {window} / --relative need --analysis (a folder of diffprobe features "
            "analyse)"
        )
    if channel is not None:
        channels = _site_channels(model, site) if analysis is None else analysis.channels(site)
        if not 0 <= channel < channels:
            raise FeaturesError(
                f"--channel {channel}: site '{site}' has channels 0..{channels - 1}"
            )
    last = model.num_train_timesteps - 1
    if window == "all":
        chosen = None
    elif window == "active":
        spans = analysis.active(site, channel)
        if not spans:
            raise FeaturesError(f"channel {channel} of '{site}' has no active timesteps")
        chosen = TimestepSet([t for a, b in spans for t in range(a, b + 1)], tolerance=0.5)
    elif window == "peaks":
        peaks = analysis.peaks(site, channel)
        if not peaks:
            raise FeaturesError(f"channel {channel} of '{site}' has no activity peaks")
        spacing = (
            float(np.median(np.abs(np.diff(analysis.timesteps))))
            if len(analysis.timesteps) > 1
            else 1.0
        )
        chosen = TimestepSet([p["timestep"] for p in peaks], tolerance=spacing / 2)
    else:
        bounds = _low_high(window)
        if bounds is None:
            raise FeaturesError(
                f"--window {window!r}: expected all, active, peaks or LOW-HIGH (e.g. 200-600)"
            )
        if bounds[0] > bounds[1] or bounds[1] < 0 or bounds[0] > last:
            raise FeaturesError(
                f"--window {window}: a timestep range LOW-HIGH inside the schedule 0..{last}"
            )
        chosen = TimestepWindow(*bounds)
    if relative is not None:
        if channel is None:
            raise FeaturesError("--relative needs --channel (the max activation of a channel)")
        top = analysis.table(site, "max")[channel]
        value = TimestepProfile(tuple(analysis.timesteps), tuple(relative * top))
    else:
        value = float(strength)
    return Steer(site, channel=channel, direction=direction, mode=mode, strength=value,
                 window=chosen, mask=mask, branch=branch)  # fmt: skip


def _site_channels(model, site: str) -> int:
    """The channel count of a denoiser site, read from a capture of a one-step generation (works
    for any model, also one built from a pipeline without a registered alias)."""
    from diffprobe.hooks.engine import capture

    with capture(model, [site]) as cache:
        model.generate("", steps=1, guidance_scale=1.0, seed=0)
    value = cache.records(site)[0].value
    return int(value.shape[1] if value.dim() == 4 else value.shape[-1])


def _save_png(path: Path, pixels: np.ndarray) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8)).save(buffer, "PNG")
    write_bytes(path, buffer.getvalue())


def prior_settings(strength: float | None, relative: float | None):
    """The thesis' prior stage: (prompts, seeds, guidance, relative strength): the empty
    prompt, its five seeds, no CFG, and × :data:`THESIS_SCALE` max activation unless a strength
    is given."""
    from diffprobe.interventions.steer import THESIS_SCALE, THESIS_SEEDS

    if strength is None and relative is None:
        relative = THESIS_SCALE
    return [""], list(THESIS_SEEDS), 1.0, relative


def steer_to_folder(
    model,
    steers: list,
    out: str | Path,
    *,
    prompts: Sequence[str] = ("",),
    seeds: Sequence[int] = (0,),
    steps: int = 25,
    guidance_scale: float | None = None,
    size: int | None = None,
    prior: bool = False,
    baseline: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate every prompt × seed with each steer (one folder per steer), and without any
    (``baseline/``); with ``prior`` (the thesis' prior stage) also save the latents
    (``latents/prior_latent_j.safetensors``, the pipeline's ``output_type="latent"``) for deep
    dream. Writes ``steer.json``; returns ``out``."""
    from safetensors.torch import save as save_tensors
    from tqdm.auto import tqdm

    from diffprobe.interventions.steer import steer

    check_output(out, STEER_KIND, overwrite=overwrite)
    out = claim_output(out, STEER_KIND, overwrite=overwrite)
    prompts, seeds = list(prompts), list(seeds)
    pairs = [(p, s) for p in prompts for s in seeds]
    jobs = [("baseline", [])] if baseline else []
    jobs += [(_steer_name(st), [st]) for st in steers]
    record = []
    for name, chosen in tqdm(jobs, disable=not progress, desc="steer", unit="run"):
        kwargs = {"seed": [s for _, s in pairs], "steps": steps, "guidance_scale": guidance_scale,
                  "size": size}  # fmt: skip
        images = steer(model, [p for p, _ in pairs], chosen, **kwargs)
        for j, pixels in enumerate(images):
            _save_png(out / name / "images" / f"prior_image_{j}.png", pixels)
        if prior:
            latents = steer(model, [p for p, _ in pairs], chosen, output_type="latent", **kwargs)
            for j, latent in enumerate(latents):
                data = save_tensors({"latent": latent.detach().cpu().contiguous()})
                write_bytes(out / name / "latents" / f"prior_latent_{j}.safetensors", data)
        record.append({"name": name, "steers": [_describe(st) for st in chosen]})
    write_json(out / "steer.json", {
        "prompts": prompts, "seeds": seeds, "steps": steps, "guidance_scale": guidance_scale,
        "size": size, "prior": prior, "items": [{"prompt": p, "seed": s} for p, s in pairs],
        "runs": record, "versions": versions(),
    })  # fmt: skip
    return out


def _steer_name(st) -> str:
    what = f"channel_{st.channel:04d}" if st.channel is not None else "direction"
    return f"{site_key(st.site)}/{what}"


def _describe(st) -> dict:
    from diffprobe.hooks.edits import TimestepProfile

    strength = st.strength
    if isinstance(strength, TimestepProfile):
        strength = {"timesteps": list(strength.timesteps), "values": list(strength.values)}
    window = st.window
    if window is not None:
        window = {"kind": type(window).__name__, **{k: getattr(window, k) for k in
                  ("low", "high", "timesteps", "tolerance") if hasattr(window, k)}}  # fmt: skip
    return {"site": st.site, "channel": st.channel, "direction": st.direction is not None,
            "mode": st.mode, "strength": strength, "window": window, "branch": st.branch,
            "mask": st.mask is not None}  # fmt: skip
