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


def _print_evaluation(result, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=1, default=float))
        return
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
        """Train a TopK SAE on a run's spatial activations (every token of every noise level)
        or on a .npy file; writes OUT in the SAELens layout. The same command resumes."""

        from diffprobe.sae.train import TrainConfig, train_sae

        setup(quiet)
        config = TrainConfig(expansion=expansion, d_sae=d_sae, k=k, batch_topk=batch_topk,
                             aux_alpha=aux_alpha, dead_tokens=dead_tokens, lr=lr,
                             batch_size=batch_size, epochs=epochs, tokens=tokens,
                             normalization=normalize, buffer_tokens=buffer_tokens, seed=seed,
                             checkpoint_every=checkpoint_every)  # fmt: skip
        config.validate()
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
        tokens: Annotated[int | None, typer.Option(help="tokens to read (default: all)")] = None,
        batch_size: Annotated[int, typer.Option(help="tokens per forward pass")] = 4096,
        layout: Layout = None,
        hookpoint: Hookpoint = None,
        device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
        as_json: AsJson = False,
        quiet: Quiet = False,
    ) -> None:
        """FVU, L0 and dead fraction of the SAE at PATH on a run's activations (per noise
        level) or a .npy file."""

        from diffprobe.sae.evaluate import evaluate_sae
        from diffprobe.sae.formats import load_sae
        from diffprobe.sae.model import check_size
        from diffprobe.sae.train import resolve_device

        setup(quiet)
        if tokens is not None:
            check_size("--tokens", tokens)
        check_size("--batch-size", batch_size)
        chosen = resolve_device(device)
        sae = load_sae(path, layout=layout, hookpoint=hookpoint, device=chosen)
        source = _source(run, site, noise, condition, activations)
        sae.check_d_in(source.d_in, site)
        result = evaluate_sae(sae, source, tokens=tokens, batch_size=batch_size,
                              progress=not quiet)  # fmt: skip
        _print_evaluation(result, as_json)

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
