"""``diffprobe sae train | eval | info``: thin wrappers over :mod:`diffprobe.sae`
(docs/sae.md). ``register(app)`` adds the ``sae`` command group to the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from diffprobe.cli.common import AsJson, Quiet, setup

Run = Annotated[
    Path | None, typer.Option(help="run folder written by `diffprobe extract --pooling none`")
]
Site = Annotated[str | None, typer.Option(help="site of the run (with --activations: a label)")]
Noise = Annotated[
    list[str] | None, typer.Option(help="noise keys of the run, e.g. p0.2 (default: all)")
]
Condition = Annotated[
    str | None, typer.Option(help="stored condition (default: the conditional branch)")
]
Activations = Annotated[Path | None, typer.Option(help=".npy file of (tokens, d_in) vectors")]
Layout = Annotated[str | None, typer.Option(help="saelens | sparsify | openai (default: detect)")]
Hookpoint = Annotated[str | None, typer.Option(help="subfolder of a multi-hookpoint folder")]
Model = Annotated[
    str | None, typer.Option(help="generate with this model (alias, hub id, local folder)")
]
Prompts = Annotated[
    str | None,
    typer.Option(help="with --model: shapes:N[:SEED[:SPLIT]] or a text file, one a line"),
]
Steps = Annotated[int, typer.Option(help="with --model: sampler steps per generation")]
Guidance = Annotated[
    float | None, typer.Option(help="with --model: guidance scale (default: the family's)")
]
Branch = Annotated[str, typer.Option(help="with --model: cond | uncond | both (CFG halves)")]
BatchItems = Annotated[int, typer.Option(help="with --model: prompts per generation")]
Dtype = Annotated[str, typer.Option(help="with --model: fp32 | fp16 | bf16")]


def _prompts(spec: str | None):
    """(captions, shapes factors or None) of --prompts."""
    from diffprobe.sae.model import SAEError

    if not spec:
        raise SAEError("--model needs --prompts (shapes:N or a text file, one prompt a line)")
    if spec.startswith("shapes:"):
        from diffprobe.data import shapes
        from diffprobe.data.sources import parse_shapes_spec

        n, seed, split = parse_shapes_spec(spec)
        drawn = shapes.sample(n, seed=seed, split=split)
        return drawn.captions, drawn.factors
    from diffprobe.data.sources import read_text_file

    lines = [line.strip() for line in read_text_file(Path(spec), "--prompts").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise SAEError(f"--prompts {spec} holds no prompt; write one prompt a line")
    return lines, None


def _generation(model, prompts, site, semantics, branch, steps, guidance, seed, batch_items,
                device, dtype, quiet, keep=False):  # fmt: skip
    from diffprobe.loading import load
    from diffprobe.sae.generation import check_generation_options, generation_source
    from diffprobe.sae.model import SAEError, check_size

    if not site:
        raise SAEError(f"--model {model} needs --site SITE, e.g. unet.up_blocks.1")
    check_generation_options(site, semantics or "output", branch)
    check_size("--steps", steps)
    check_size("--batch-items", batch_items)
    captions, factors = _prompts(prompts)
    loaded = load(model, dtype=dtype, device=None if device == "auto" else device)
    source = generation_source(loaded, site, captions, semantics=semantics or "output",
                               branch=branch, steps=steps, guidance_scale=guidance, seed=seed,
                               batch_items=batch_items, progress=not quiet,
                               keep_in_memory=keep)  # fmt: skip
    return loaded, source, captions, factors


def _source(run: Path | None, site: str | None, noise, condition, activations: Path | None):
    from diffprobe.sae.model import SAEError
    from diffprobe.sae.sources import open_activations, run_source

    if (run is None) == (activations is None):
        raise SAEError(
            "give the activations either as --run RUN --site SITE or as --activations FILE.npy "
            "(one of the two)"
        )
    if activations is not None:
        for given, option in ((noise, "--noise"), (condition, "--condition")):
            if given:
                raise SAEError(f"{option} selects arrays of a run; it does not apply to "
                               "--activations")  # fmt: skip
        source = open_activations(activations)
        if site:
            source.metadata = {"site": site, "hook_name": site}
        return source
    if not site:
        raise SAEError(f"--run {run} needs --site SITE (one of the run's sites)")
    return run_source(run, site, noise=noise or None, condition=condition)


def _only_one(run, activations) -> None:
    from diffprobe.sae.model import SAEError

    if run is not None or activations is not None:
        raise SAEError("give the activations as one of --run, --activations or --model")


def _print_evaluation(result, as_json: bool, spliced: dict | None = None) -> None:
    if as_json:
        payload = result.as_dict()
        if spliced is not None:
            payload["splice"] = spliced
        typer.echo(json.dumps(payload, indent=1, default=float))
        return
    if spliced is not None:
        typer.echo(
            f"spliced in ({spliced['items']} images): pixel MSE {spliced['pixel_mse']:.5f}"
            f"; with the error kept identical: {spliced['error_kept_identical']}"
        )
        for name in ("plain", "reconstruction"):
            scores = spliced.get(f"attributes_{name}")
            if scores:
                typer.echo(
                    f"attribute reader, {name}: "
                    + "  ".join(
                        f"{k} {v:.3f}" for k, v in scores.items() if k != "background_items"
                    )
                )
    typer.echo(
        f"tokens {result.tokens}  FVU {result.fvu:.4f}  L0 {result.l0:.2f}  "
        f"dead fraction {result.dead_fraction:.4f}"
    )
    if result.groups:
        width = max(len(name) for name in result.groups)
        typer.echo(f"{'group'.ljust(width)}  {'tokens':>9}  {'FVU':>8}  {'L0':>6}")
        for name, row in result.groups.items():
            typer.echo(f"{name.ljust(width)}  {row['tokens']:>9}  {row['fvu']:>8.4f}  "
                       f"{row['l0']:>6.2f}")  # fmt: skip


def register(app: typer.Typer) -> None:
    sae_app = typer.Typer(
        name="sae",
        help="Sparse autoencoders: train on a run's activations, evaluate, inspect files.",
        no_args_is_help=True,
    )
    app.add_typer(sae_app, name="sae")

    @sae_app.command("train")
    def train(
        out: Annotated[Path, typer.Option(help="output folder (SAELens layout + checkpoints)")],
        run: Run = None,
        site: Site = None,
        noise: Noise = None,
        condition: Condition = None,
        activations: Activations = None,
        model: Model = None,
        prompts: Prompts = None,
        steps: Steps = 20,
        guidance: Guidance = None,
        branch: Branch = "cond",
        batch_items: BatchItems = 16,
        keep_in_memory: Annotated[
            bool, typer.Option(help="with --model: replay the first pass from memory")
        ] = False,
        dtype: Dtype = "fp32",
        expansion: Annotated[int, typer.Option(help="latents per input channel")] = 16,
        d_sae: Annotated[int | None, typer.Option(help="latents (overrides --expansion)")] = None,
        k: Annotated[int, typer.Option(help="active latents per token")] = 32,
        batch_topk: Annotated[
            bool, typer.Option(help="BatchTopK in training (inference is per-token TopK)")
        ] = True,
        aux_alpha: Annotated[float, typer.Option(help="weight of the AuxK loss")] = 1 / 32,
        dead_tokens: Annotated[
            int, typer.Option(help="tokens without firing after which a latent is dead")
        ] = 10_000_000,
        lr: Annotated[float, typer.Option(help="Adam learning rate (linear decay to 0)")] = 4e-4,
        batch_size: Annotated[int, typer.Option(help="tokens per step")] = 4096,
        epochs: Annotated[int, typer.Option(help="passes over the activations")] = 1,
        tokens: Annotated[
            int | None, typer.Option(help="training tokens in all (overrides --epochs)")
        ] = None,
        normalize: Annotated[
            str, typer.Option(help="none | layer_norm (SAeUron's input_unit_norm)")
        ] = "none",
        buffer_tokens: Annotated[int, typer.Option(help="shuffling buffer in tokens")] = 65536,
        seed: int = 0,
        device: Annotated[str, typer.Option(help="auto (the GPU when present) | cpu | cuda")] = (
            "auto"
        ),
        checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 1000,
        until_step: Annotated[
            int | None, typer.Option(help="stop after this step, keeping a checkpoint")
        ] = None,
        site_semantics: Annotated[
            str | None, typer.Option(help="output | input | delta (recorded in the metadata)")
        ] = None,
        overwrite: Annotated[
            bool, typer.Option(help="replace an earlier, different training in OUT")
        ] = False,
        quiet: Quiet = False,
    ) -> None:
        """Train a TopK SAE on a run's spatial activations (every token of every noise level),
        a .npy file, or streamed from generation (--model --prompts: every token of every
        timestep, nothing written but the SAE); writes OUT in the SAELens layout. The same
        command resumes."""

        from diffprobe.sae.train import TrainConfig, train_sae

        setup(quiet)
        config = TrainConfig(expansion=expansion, d_sae=d_sae, k=k, batch_topk=batch_topk,
                             aux_alpha=aux_alpha, dead_tokens=dead_tokens, lr=lr,
                             batch_size=batch_size, epochs=epochs, tokens=tokens,
                             normalization=normalize, buffer_tokens=buffer_tokens, seed=seed,
                             checkpoint_every=checkpoint_every)  # fmt: skip
        config.validate()
        if model is not None:
            from diffprobe.io import check_output

            _only_one(run, activations)
            check_output(out, "sae", overwrite=overwrite)
            source = _generation(model, prompts, site, site_semantics, branch, steps, guidance,
                                 seed, batch_items, device, dtype, quiet, keep_in_memory)[1]  # fmt: skip
        else:
            source = _source(run, site, noise, condition, activations)
        metadata = {"site_semantics": site_semantics} if site_semantics else None
        sae = train_sae(source, out, config=config, metadata=metadata, device=device,
                        overwrite=overwrite, until_step=until_step, progress=not quiet)  # fmt: skip
        done = (out / "training.json").is_file()
        what = "trained" if done else f"stopped at step {until_step}, checkpoint kept"
        typer.echo(f"{what}: d_in {sae.d_in}, d_sae {sae.d_sae}, k {sae.k}", err=True)
        typer.echo(str(out))

    @sae_app.command("eval")
    def evaluate(
        path: Annotated[Path, typer.Argument(help="SAE folder (any supported layout)")],
        run: Run = None,
        site: Site = None,
        noise: Noise = None,
        condition: Condition = None,
        activations: Activations = None,
        model: Model = None,
        prompts: Prompts = None,
        steps: Steps = 20,
        guidance: Guidance = None,
        branch: Branch = "cond",
        batch_items: BatchItems = 16,
        dtype: Dtype = "fp32",
        seed: Annotated[int, typer.Option(help="with --model: seed of the first generation")] = 0,
        splice: Annotated[
            bool,
            typer.Option(help="with --model: also generate with the SAE spliced in (image change)"),
        ] = False,
        tokens: Annotated[int | None, typer.Option(help="tokens to read (default: all)")] = None,
        batch_size: Annotated[int, typer.Option(help="tokens per forward pass")] = 4096,
        layout: Layout = None,
        hookpoint: Hookpoint = None,
        device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
        as_json: AsJson = False,
        quiet: Quiet = False,
    ) -> None:
        """FVU, L0 and dead fraction of the SAE at PATH on a run's activations (per noise
        level), a .npy file, or generations (--model --prompts, per timestep; --splice adds
        the images' change with the SAE's reconstruction in place of the site)."""

        from diffprobe.sae.evaluate import evaluate_sae
        from diffprobe.sae.formats import load_sae
        from diffprobe.sae.model import SAEError, check_size
        from diffprobe.sae.train import resolve_device

        setup(quiet)
        if tokens is not None:
            check_size("--tokens", tokens)
        check_size("--batch-size", batch_size)
        chosen = resolve_device(device)
        sae = load_sae(path, layout=layout, hookpoint=hookpoint, device=chosen)
        loaded = None
        if model is not None:
            _only_one(run, activations)
            semantics = sae.metadata.get("site_semantics") or "output"
            loaded, source, captions, factors = _generation(
                model, prompts, site, semantics, branch, steps, guidance, seed, batch_items,
                device, dtype, quiet)  # fmt: skip
        else:
            if splice:
                raise SAEError("--splice generates images: it needs --model and --prompts")
            source = _source(run, site, noise, condition, activations)
        sae.check_d_in(source.d_in, site)
        result = evaluate_sae(sae, source, tokens=tokens, batch_size=batch_size,
                              progress=not quiet)  # fmt: skip
        spliced = None
        if splice and loaded is not None:
            from diffprobe.sae.generation import splice_test

            spliced = splice_test(loaded, sae, site, captions, steps=steps,
                                  guidance_scale=guidance, seed=seed, batch_items=batch_items,
                                  factors=factors)  # fmt: skip
        _print_evaluation(result, as_json, spliced)

    @sae_app.command("info")
    def info(
        path: Annotated[Path, typer.Argument(help="SAE folder (any supported layout)")],
        layout: Layout = None,
        hookpoint: Hookpoint = None,
        as_json: AsJson = False,
    ) -> None:
        """Print an SAE's layout, d_in, d_sae, k, normalisation and metadata."""
        from diffprobe.sae.formats import load_sae

        described = load_sae(path, layout=layout, hookpoint=hookpoint).describe()
        if as_json:
            typer.echo(json.dumps(described, indent=1, default=str))
            return
        for key, value in described.items():
            if key == "metadata":
                continue
            typer.echo(f"{key}: {value}")
        for key, value in described["metadata"].items():
            typer.echo(f"metadata.{key}: {value}")
