"""Training a TopK SAE on activations (``diffprobe sae train``; docs/sae.md).

The loss is sparsify's: FVU of the batch plus ``aux_alpha`` x the AuxK loss,

    FVU  = sum((x - x^)^2) / sum((x - mean_batch(x))^2)
    AuxK = min(dead / k_aux, 1) * sum((e^ - (x - x^))^2) / sum((x - mean_batch(x))^2)

where ``e^`` is the reconstruction (without ``b_dec``) from the ``k_aux`` (``d_in // 2``)
largest pre-activations among the *dead* latents, those that have not fired for
``dead_tokens`` tokens. Adam with a linear decay to 0 and no warm-up (SAeUron); after each
step the decoder rows are renormalised, and before it the gradient component parallel to each
row is removed. With ``batch_topk`` the k x tokens largest activations of the whole batch are
kept (per-token TopK is always used at inference).

The step is sparse: only the selected (token, latent) pairs enter the backward pass, as
sparse matrix products (``_SparseEncode``), so its cost is the encoder matmul and the TopK.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffprobe.sae.model import SAEError, TopKSAE, check_size
from diffprobe.sae.sources import (
    ActivationSource,
    IterableSource,
    as_source,
    batch_stream,
    fingerprint,
)

log = logging.getLogger(__name__)

SAE_KIND = "sae"
TRAINING_JSON = "training.json"
CHECKPOINT = "checkpoint"
STATE_JSON = "state.json"


@dataclass
class TrainConfig:
    """Hyperparameters; the defaults are SAeUron's (README: x16, k 32, AuxK 1/32, lr 4e-4,
    batches of 4096 tokens, BatchTopK in training)."""

    expansion: int = 16
    d_sae: int | None = None
    """Latents; None: ``expansion`` x d_in."""
    k: int = 32
    batch_topk: bool = True
    aux_alpha: float = 1 / 32
    k_aux: int | None = None
    """Dead latents in the AuxK reconstruction; None: d_in // 2 (the OpenAI paper)."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many tokens without firing (sparsify, SAeUron)."""
    lr: float = 4e-4
    batch_size: int = 4096
    epochs: int = 1
    tokens: int | None = None
    """Training tokens in all; None: ``epochs`` passes over the source."""
    normalization: str = "none"
    buffer_tokens: int = 65536
    """Shuffling buffer of the sources read block by block (maps, iterators)."""
    seed: int = 0
    matmul: str = "auto"
    """Encoder matmul dtype: float32, bfloat16, or auto (bfloat16 on CUDA as sparsify does)."""
    checkpoint_every: int = 1000
    """Steps between checkpoints of a training with an output folder."""
    log_every: int = 20

    def validate(self) -> None:
        check_size("expansion", self.expansion)
        if self.d_sae is not None:
            check_size("d_sae", self.d_sae)
        check_size("k", self.k)
        if self.k_aux is not None:
            check_size("k_aux", self.k_aux)
        check_size("dead_tokens", self.dead_tokens)
        check_size("batch_size", self.batch_size)
        check_size("epochs", self.epochs)
        if self.tokens is not None:
            check_size("tokens", self.tokens)
        check_size("buffer_tokens", self.buffer_tokens, minimum=0)
        check_size("seed", self.seed, minimum=0)
        check_size("checkpoint_every", self.checkpoint_every)
        check_size("log_every", self.log_every)
        for name in ("lr", "aux_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SAEError(f"{name} {value!r} must be a number")
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise SAEError(f"{name} {value!r} must be a finite number > 0")
        if self.matmul not in ("auto", "float32", "bfloat16"):
            raise SAEError(f"matmul {self.matmul!r} must be auto, float32 or bfloat16")


# ----------------------------------------------------------------------------- the sparse step


class _SparseEncode(torch.autograd.Function):
    """Encoder matmul + TopK (per token or over the batch) + the AuxK selection among dead
    latents, with a backward pass over the selected pairs only: the gradients of the encoder
    rows and of the inputs are sparse x dense products."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, k, batch_topk, dead_mask, k_aux, matmul_dtype):
        n = inputs.shape[0]
        if matmul_dtype is not None and matmul_dtype != inputs.dtype:
            hidden = F.linear(inputs.to(matmul_dtype), weight.to(matmul_dtype),
                              bias.to(matmul_dtype))  # fmt: skip
        else:
            hidden = F.linear(inputs, weight, bias)
        if batch_topk:
            values, rows, cols = batch_topk_select(hidden, k)
        else:
            values, cols = hidden.topk(k, dim=-1, sorted=False)
            values, cols = values.reshape(-1), cols.reshape(-1)
            rows = torch.arange(n, device=hidden.device).repeat_interleave(k)
        values = torch.relu(values.to(inputs.dtype))
        if dead_mask is not None:
            # only the dead latents' columns: usually few, so much less than a masked copy
            dead = dead_mask.nonzero().squeeze(1)
            aux_values, where = hidden.index_select(1, dead).topk(k_aux, dim=-1, sorted=False)
            aux_cols = dead[where]
            aux_values = torch.relu(aux_values.to(inputs.dtype))
        else:
            aux_values = inputs.new_zeros(n, 0)
            aux_cols = torch.zeros(n, 0, dtype=torch.long, device=inputs.device)
        ctx.save_for_backward(inputs, weight, rows, cols, values > 0, aux_cols, aux_values > 0)
        ctx.mark_non_differentiable(rows, cols, aux_cols)
        return values, rows, cols, aux_values, aux_cols

    @staticmethod
    def backward(ctx, g_values, _g_rows, _g_cols, g_aux, _g_aux_cols):
        inputs, weight, rows, cols, gate, aux_cols, aux_gate = ctx.saved_tensors
        n, m = inputs.shape[0], weight.shape[0]
        g = (
            torch.zeros_like(gate, dtype=inputs.dtype)
            if g_values is None
            else torch.where(gate, g_values, 0)
        )
        if aux_cols.shape[1] and g_aux is not None:
            aux_rows = torch.arange(n, device=rows.device).repeat_interleave(aux_cols.shape[1])
            rows = torch.cat([rows, aux_rows])
            cols = torch.cat([cols, aux_cols.reshape(-1)])
            g = torch.cat([g, torch.where(aux_gate, g_aux, 0).reshape(-1)])
        g = g.to(inputs.dtype)
        by_latent = torch.sparse_coo_tensor(
            torch.stack([cols, rows]), g, (m, n), check_invariants=False
        )
        grad_inputs = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            by_token = torch.sparse_coo_tensor(
                torch.stack([rows, cols]), g, (n, m), check_invariants=False
            )
            grad_inputs = torch.sparse.mm(by_token, weight)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.sparse.mm(by_latent, inputs)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return grad_inputs, grad_weight, grad_bias, None, None, None, None, None


def batch_topk_select(hidden: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k x tokens`` largest entries of ``hidden`` (tokens, latents): values, row and
    column indices, sorted by row. The candidates are each row's 4k largest; that is exact
    whenever every row's 4k-th value is below the batch threshold (checked; otherwise the
    whole matrix is searched)."""
    n, m = hidden.shape
    total = n * k
    width = min(4 * k, m)
    candidates, where = hidden.topk(width, dim=-1, sorted=False)
    values, position = candidates.reshape(-1).topk(total, sorted=False)
    if width < m and bool((candidates.min(dim=1).values >= values.min()).any()):
        values, flat = hidden.reshape(-1).topk(total, sorted=False)
        rows, cols = flat // m, flat % m
    else:
        rows, cols = position // width, where.reshape(-1)[position]
    order = rows.argsort(stable=True)
    return values[order], rows[order], cols[order]


@dataclass
class StepMetrics:
    fvu: Tensor
    aux_loss: Tensor
    l0: Tensor


class SAETrainer:
    """One SAE, its Adam optimiser and dead-latent counters; :meth:`step` trains on a batch.
    The data loop, checkpoints and the learning-rate schedule are :func:`train_sae`'s."""

    def __init__(self, sae: TopKSAE, config: TrainConfig):
        self.sae, self.config = sae, config
        self.k_aux = min(config.k_aux or max(sae.d_in // 2, 1), sae.d_sae)
        params = [sae.encoder, sae.b_enc, sae.W_dec, sae.b_dec]
        try:
            self.optimizer = torch.optim.Adam(params, lr=config.lr, fused=True)
        except RuntimeError:  # a device without the fused kernel
            self.optimizer = torch.optim.Adam(params, lr=config.lr)
        self.tokens_since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.device)
        self.step_count = 0
        matmul = config.matmul
        if matmul == "auto":
            matmul = "bfloat16" if sae.device.type == "cuda" else "float32"
        self.matmul_dtype = torch.bfloat16 if matmul == "bfloat16" else None

    def loss(self, inputs: Tensor) -> tuple[Tensor, StepMetrics, Tensor]:
        """The loss of a normalised batch ``(tokens, d_in)``, its metrics, and the indices of
        the latents that fired."""
        sae, cfg = self.sae, self.config
        n = inputs.shape[0]
        dead_mask = None
        if cfg.aux_alpha > 0:
            dead = self.tokens_since_fired >= cfg.dead_tokens
            num_dead = int(dead.sum())
            if num_dead:
                dead_mask = dead
        k_aux = min(self.k_aux, num_dead) if dead_mask is not None else 0
        shifted = inputs - sae.b_dec if sae.apply_b_dec_to_input else inputs
        values, rows, cols, aux_values, aux_cols = _SparseEncode.apply(
            shifted, sae.encoder, sae.b_enc, sae.k, cfg.batch_topk, dead_mask, k_aux,
            self.matmul_dtype,
        )  # fmt: skip
        offsets = torch.searchsorted(rows, torch.arange(n, device=rows.device))
        recon = F.embedding_bag(cols, sae.W_dec, offsets, mode="sum", per_sample_weights=values)
        error = inputs - (recon + sae.b_dec)
        total_variance = (inputs - inputs.mean(0)).pow(2).sum()
        fvu = error.pow(2).sum() / total_variance
        loss = fvu
        aux_loss = fvu.new_zeros(())
        if dead_mask is not None:
            aux_recon = F.embedding_bag(aux_cols, sae.W_dec, mode="sum",
                                        per_sample_weights=aux_values)  # fmt: skip
            scale = min(num_dead / self.k_aux, 1.0)
            aux_loss = scale * (aux_recon - error.detach()).pow(2).sum() / total_variance
            loss = loss + cfg.aux_alpha * aux_loss
        fired = values > 0
        metrics = StepMetrics(fvu.detach(), aux_loss.detach(), fired.sum() / n)
        return loss, metrics, cols[fired]

    def step(self, batch: Tensor, lr: float | None = None) -> StepMetrics:
        """One optimiser step on ``batch`` (tokens, d_in) of raw activations."""
        sae = self.sae
        inputs, _ = sae.normalize(batch.to(sae.device, non_blocking=True))
        if self.step_count == 0:
            with torch.no_grad():
                # the batch mean centres the pre-activations at the start (sparsify, SAeUron)
                sae.b_dec.copy_(inputs.mean(0))
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        loss, metrics, fired = self.loss(inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_gradient_()
        self.optimizer.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            self.tokens_since_fired += len(inputs)
            self.tokens_since_fired[fired] = 0
        self.step_count += 1
        return metrics

    def dead_fraction(self) -> float:
        return float((self.tokens_since_fired >= self.config.dead_tokens).float().mean())

    # --------------------------------------------------------------------------- checkpoint

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"sae.{n}": p.detach() for n, p in self.sae.named_parameters()}
        names = {id(p): n for n, p in self.sae.named_parameters()}
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                tensors[f"adam.{names[id(param)]}.{key}"] = torch.as_tensor(value)
        tensors["tokens_since_fired"] = self.tokens_since_fired
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        sae = self.sae
        with torch.no_grad():
            for name, param in sae.named_parameters():
                param.copy_(tensors[f"sae.{name}"])
        device = sae.device
        for name, param in sae.named_parameters():
            state = {
                key.rsplit(".", 1)[1]: value.to(device)
                for key, value in tensors.items()
                if key.startswith(f"adam.{name}.")
            }
            if state:
                self.optimizer.state[param] = state
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])


# ----------------------------------------------------------------------------------- training


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None): the GPU when there is one, else the CPU; otherwise as given,
    refused unless this machine has it."""
    from diffprobe.loading import parse_device

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(device)


def plan_steps(source: ActivationSource, config: TrainConfig) -> int:
    """Optimiser steps of a training: ``tokens`` // batch, or batches of ``epochs`` passes."""
    batch = config.batch_size
    if config.tokens is not None:
        steps = config.tokens // batch
        if steps == 0:
            raise SAEError(
                f"tokens {config.tokens} is less than one batch of {batch}; train on more "
                "tokens or use a smaller batch size (--batch-size)"
            )
        return steps
    if source.n_tokens is None:
        raise SAEError(
            "an iterator of activations has no length: give the number of training tokens "
            "(tokens=N, --tokens N)"
        )
    per_epoch = source.n_tokens // batch
    if per_epoch == 0:
        raise SAEError(
            f"the activations hold {source.n_tokens} tokens, less than one batch of {batch}; "
            "use a smaller batch size (--batch-size)"
        )
    return per_epoch * config.epochs


def _epochs_needed(source: ActivationSource, config: TrainConfig, steps: int) -> int | None:
    if source.n_tokens is None:
        return None
    per_epoch = source.n_tokens // config.batch_size
    return -(-steps // per_epoch)


def train_sae(
    activations: Any,
    out: str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    metadata: dict | None = None,
    device: str | torch.device | None = "auto",
    overwrite: bool = False,
    until_step: int | None = None,
    progress: bool = True,
    **options: Any,
) -> TopKSAE:
    """Train a TopK SAE on ``activations`` (any source of :mod:`diffprobe.sae.sources`) and
    return it.

    ``config`` (or its fields as keyword ``options``) sets the hyperparameters. ``metadata``
    (model_name, site, branch, timesteps, scheduler, site_semantics) is recorded with the
    SAE; a run source fills it in. With ``out`` the SAE is written there in the SAELens
    layout with ``training.json``, and a checkpoint every ``checkpoint_every`` steps: the same
    call resumes from it and ends with the same weights as an uninterrupted run.
    ``until_step`` stops after that step (with a checkpoint), as a job's time limit would.
    """
    from diffprobe.sae.formats import save_sae

    config = config or TrainConfig()
    if options:
        unknown = sorted(set(options) - set(TrainConfig.__dataclass_fields__))
        if unknown:
            raise SAEError(
                f"unknown training option {unknown[0]!r}; the options are "
                f"{', '.join(TrainConfig.__dataclass_fields__)}"
            )
        config = TrainConfig(**{**asdict(config), **options})
    config.validate()
    if until_step is not None:
        check_size("until_step", until_step)
    device = resolve_device(device)
    source = as_source(activations)
    if isinstance(source, IterableSource):
        source.peek_d_in()
    steps = plan_steps(source, config)
    d_in = source.d_in
    d_sae = config.d_sae or d_in * config.expansion
    if config.k > d_sae:
        raise SAEError(f"k {config.k} is larger than d_sae {d_sae}; k must be at most d_sae")
    meta = {**source.metadata, **(metadata or {})}
    identity = fingerprint(
        {
            "config": {**asdict(config), "checkpoint_every": None, "log_every": None},
            "source": source.describe(),
            "d_in": d_in,
            "steps": steps,
        }  # fmt: skip
    )
    sae = TopKSAE(d_in, d_sae, config.k, normalization=config.normalization, metadata=meta,
                  seed=config.seed, device=device)  # fmt: skip
    trainer = SAETrainer(sae, config)
    history: list[dict] = []
    seconds = 0.0
    folder = None
    if out is not None:
        folder, done = _prepare_output(Path(out), identity, overwrite)
        if done is not None:
            log.info("%s already holds this training, finished; loading it", folder)
            from diffprobe.sae.formats import load_sae

            return load_sae(folder)
        resumed = _resume(folder, identity, trainer)
        if resumed is not None:
            history, seconds = resumed["history"], resumed["seconds"]
            if not source.resumable:
                raise SAEError(
                    f"{folder} holds a checkpoint at step {trainer.step_count}, but a one-pass "
                    "iterator cannot be replayed to that point; pass a function returning a "
                    "fresh iterator, or --overwrite to start again"
                )
            log.info("resuming %s at step %d of %d", folder, trainer.step_count, steps)
    stream = batch_stream(source, config.batch_size, config.seed, config.buffer_tokens,
                          _epochs_needed(source, config, steps))  # fmt: skip
    for _ in range(trainer.step_count):  # replay the data order up to the checkpoint
        next(stream, None)
    last = min(steps, until_step) if until_step is not None else steps
    seconds = _loop(trainer, stream, steps, last, folder, identity, history, seconds, progress)
    if trainer.step_count < steps:
        if until_step is not None and trainer.step_count >= until_step:
            return sae  # stopped as asked, with a checkpoint when there is a folder
        raise SAEError(
            f"the activations ran out after {trainer.step_count} of {steps} steps; give fewer "
            "tokens (--tokens) or more data"
        )
    final = {
        "step": trainer.step_count,
        "tokens": trainer.step_count * config.batch_size,
        "dead_fraction": trainer.dead_fraction(),
        **(history[-1] if history else {}),
    }
    if folder is not None:
        save_sae(sae, folder, claim=False)
        from diffprobe.io import write_json

        write_json(
            folder / TRAINING_JSON,
            {
                "done": True,
                "identity": identity,
                "config": asdict(config),
                "source": source.describe(),
                "device": str(device),
                "steps": steps,
                "seconds": round(seconds, 3),
                "tokens_per_second": round(final["tokens"] / max(seconds, 1e-9), 1),
                "final": final,
                "history": history,
            },
        )
        _drop_checkpoints(folder)
    return sae


def _loop(
    trainer: SAETrainer,
    stream: Iterator,
    steps: int,
    last: int,
    folder: Path | None,
    identity: str,
    history: list[dict],
    seconds: float,
    progress: bool,
) -> float:
    from tqdm.auto import tqdm

    config = trainer.config
    bar = tqdm(total=steps, initial=trainer.step_count, disable=not progress, desc="sae train",
               unit="step", file=sys.stderr)  # fmt: skip
    sums = {"fvu": 0.0, "aux_loss": 0.0, "l0": 0.0}
    accumulated: list[StepMetrics] = []
    began = time.perf_counter()
    try:
        while trainer.step_count < last:
            batch = next(stream, None)
            if batch is None:
                break
            lr = config.lr * (1 - trainer.step_count / steps)
            accumulated.append(trainer.step(batch[0], lr))
            bar.update(1)
            if trainer.step_count % config.log_every == 0 or trainer.step_count == last:
                for name in sums:
                    sums[name] = float(torch.stack([getattr(m, name) for m in accumulated]).mean())
                row = {
                    "step": trainer.step_count,
                    "tokens": trainer.step_count * config.batch_size,
                    "lr": lr,
                    "fvu": round(sums["fvu"], 6),
                    "l0": round(sums["l0"], 3),
                    "aux_loss": round(sums["aux_loss"], 6),
                    "dead_fraction": round(trainer.dead_fraction(), 6),
                }
                history.append(row)
                accumulated.clear()
                bar.set_postfix(fvu=f"{row['fvu']:.4f}", l0=f"{row['l0']:.1f}",
                                dead=f"{row['dead_fraction']:.3f}")  # fmt: skip
            if folder is not None and (
                trainer.step_count % config.checkpoint_every == 0
                or (trainer.step_count == last and last < steps)
            ):
                elapsed = seconds + time.perf_counter() - began
                _checkpoint(folder, identity, trainer, history, elapsed)
    finally:
        bar.close()
    return seconds + time.perf_counter() - began


# -------------------------------------------------------------------------------- the folder


def _prepare_output(folder: Path, identity: str, overwrite: bool) -> tuple[Path, dict | None]:
    """Claim ``folder`` for an SAE training; return it and the finished training's record
    when the folder already holds this very training."""
    import json

    from diffprobe.io import check_output, claim_output

    check_output(folder, SAE_KIND, overwrite=overwrite)
    if not overwrite and folder.is_dir():
        recorded = None
        for path in (folder / TRAINING_JSON, folder / CHECKPOINT / STATE_JSON):
            try:
                recorded = json.loads(path.read_text())
                break
            except (OSError, ValueError):
                continue
        if recorded is not None and recorded.get("identity") != identity:
            raise SAEError(
                f"--out {folder} holds an SAE training with other settings or data; choose "
                "another folder, or pass --overwrite to replace it"
            )
        if recorded is not None and recorded.get("done"):
            return folder, recorded
    claim_output(folder, SAE_KIND, overwrite=overwrite,
                 entries=("cfg.json", "sae_weights.safetensors", TRAINING_JSON, CHECKPOINT))  # fmt: skip
    return folder, None


def _checkpoint(folder: Path, identity: str, trainer: SAETrainer, history, seconds) -> None:
    from safetensors.torch import save

    from diffprobe.io import write_bytes, write_json

    directory = folder / CHECKPOINT
    name = f"step-{trainer.step_count:09d}.safetensors"
    write_bytes(directory / name, save(trainer.state_tensors()))
    write_json(
        directory / STATE_JSON,
        {
            "identity": identity,
            "step": trainer.step_count,
            "weights": name,
            "seconds": round(seconds, 3),
            "history": history,
        },
    )
    for old in directory.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _resume(folder: Path, identity: str, trainer: SAETrainer) -> dict | None:
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / CHECKPOINT / STATE_JSON
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        tensors = load_file(folder / CHECKPOINT / state["weights"])
        if state["identity"] != identity:
            return None
        trainer.load_state_tensors(tensors)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise SAEError(
            f"the checkpoint in {folder / CHECKPOINT} is damaged ({type(err).__name__}: "
            f"{' '.join(str(err).split())}); pass --overwrite to train again from the start"
        ) from None
    trainer.step_count = int(state["step"])
    return {"history": list(state.get("history", [])), "seconds": float(state["seconds"])}


def _drop_checkpoints(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)
