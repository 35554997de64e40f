"""The training step of a TopK SAE and its configuration: the loss (FVU + AuxK), the sparse
backward (``_SparseEncode``), BatchTopK, the decoder-norm constraint. The loop that feeds it,
checkpoints and the output folder are :mod:`diffprobe.sae.train`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffprobe.sae.model import SAEError, TopKSAE, check_size


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
    rows and of the inputs are sparse x dense products on the CPU. On a GPU (``dense``) the
    selected gradients are scattered into a dense (tokens, latents) matrix and multiplied in
    ``matmul_dtype``: tensor cores do the dense products many times faster than cuSPARSE does
    the sparse ones at these sizes (benchmarks/sae_train.py)."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, k, batch_topk, dead_mask, k_aux, matmul_dtype,
                dense=False):  # fmt: skip
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
        ctx.dense, ctx.matmul_dtype = dense, matmul_dtype
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
        if ctx.dense:
            return (*_dense_gradients(ctx, inputs, weight, rows, cols, g), *[None] * 6)
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
        return grad_inputs, grad_weight, grad_bias, None, None, None, None, None, None


def _dense_gradients(ctx, inputs, weight, rows, cols, g):
    """The encoder's gradients from the selected (row, col, gradient) triples through a dense
    (tokens, latents) matrix: (inputs, weight, bias) gradients, None where not needed."""
    n, m = inputs.shape[0], weight.shape[0]
    dtype = ctx.matmul_dtype or inputs.dtype
    dense = torch.zeros(n, m, dtype=dtype, device=inputs.device)
    # a latent both in a token's top k and among its AuxK picks appears twice: accumulate
    dense.index_put_((rows, cols), g.to(dtype), accumulate=True)
    grad_inputs = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_inputs = (dense @ weight.to(dtype)).to(inputs.dtype)
    if ctx.needs_input_grad[1]:
        grad_weight = (dense.T @ inputs.to(dtype)).to(weight.dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
    return grad_inputs, grad_weight, grad_bias


def _dense_decode(cols: Tensor, values: Tensor, weight: Tensor, dtype) -> Tensor:
    """Σ_j values[i, j] · weight[cols[i, j]] through a dense (tokens, latents) matrix: on a GPU
    the AuxK picks (k_aux = d_in / 2 per token: 640 at d_in 1280) are too many for a gather
    and scatter-add of decoder rows, and one matmul on tensor cores does it instead. ``cols``
    hold distinct latents per row (a top-k), so the scatter needs no accumulation."""
    dtype = dtype or weight.dtype
    dense = values.new_zeros(values.shape[0], weight.shape[0], dtype=dtype)
    dense = dense.scatter(1, cols, values.to(dtype))
    return (dense @ weight.to(dtype)).to(values.dtype)


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
        # the encoder's backward through a dense matrix on a GPU, sparse products on the CPU
        self.dense_backward = sae.device.type == "cuda"

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
            self.matmul_dtype, self.dense_backward,
        )  # fmt: skip
        offsets = torch.searchsorted(rows, torch.arange(n, device=rows.device))
        recon = F.embedding_bag(cols, sae.W_dec, offsets, mode="sum", per_sample_weights=values)
        error = inputs - (recon + sae.b_dec)
        total_variance = (inputs - inputs.mean(0)).pow(2).sum()
        fvu = error.pow(2).sum() / total_variance
        loss = fvu
        aux_loss = fvu.new_zeros(())
        if dead_mask is not None:
            if self.dense_backward:
                aux_recon = _dense_decode(aux_cols, aux_values, sae.W_dec, self.matmul_dtype)
            else:
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
