"""The TopK sparse autoencoder: one in-memory model that every supported format loads into.

Maths (docs/sae.md), for an activation vector ``x`` of ``d_in`` channels:

    x' = norm(x)                                  "none", "layer_norm" or "constant_norm_rescale"
    h  = (x' - b_dec) @ W_enc + b_enc             (b_dec subtracted only with apply_b_dec_to_input)
    z  = TopK_k(ReLU(h))                          the k largest per token; all others 0
    x^ = denorm(z @ W_dec + b_dec)                rows of W_dec have unit norm

``W_enc`` is ``(d_in, d_sae)`` as in SAELens; the model keeps its transpose ``encoder``
``(d_sae, d_in)`` (row i is latent i's encoder vector), the layout whose rows the sparse
training step gathers and scatters (``diffprobe.sae.train``). Every method takes activations of
shape ``(..., d_in)``: any leading axes (tokens; items x tokens) are kept.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffprobe.errors import DiffprobeError, did_you_mean

NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")
SITE_SEMANTICS = ("output", "input", "delta")
# eps of SAeUron's input_unit_norm and SAELens's layer_norm (both add it to the std)
LAYER_NORM_EPS = 1e-5


class SAEError(DiffprobeError):
    """An SAE that cannot be built, loaded or applied as asked."""


class SparseCodes(NamedTuple):
    """Per-token TopK codes: ``values`` and ``indices`` of shape ``(..., k)``. A value may be 0
    where fewer than k pre-activations are positive (that latent did not fire)."""

    values: Tensor
    indices: Tensor


class SAEOutput(NamedTuple):
    reconstruction: Tensor
    """``(..., d_in)``, in the input's space (normalisation undone)."""

    codes: SparseCodes


class Normalization(NamedTuple):
    """Per-token statistics that :meth:`TopKSAE.denormalize` needs to undo the normalisation."""

    shift: Tensor | None
    scale: Tensor | None


def check_size(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SAEError(f"{name} {value!r} must be an integer >= {minimum}")
    return value


class TopKSAE(nn.Module):
    """A TopK SAE of ``d_in`` channels and ``d_sae`` latents, ``k`` active per token.

    ``metadata`` says what it was trained on: ``model_name``, ``site`` (the dotted diffprobe
    site, also written as SAELens's ``hook_name``), ``branch`` (``cond``, ``uncond`` or
    ``none``), ``timesteps``, ``scheduler`` and ``site_semantics`` (``output``, ``input`` or
    ``delta`` = output - input, as sdxl-unbox trains). ``feature_stats`` holds optional
    per-latent statistics of shape ``(d_sae,)`` such as sdxl-unbox's ``mean`` and ``std``
    (used to scale steering), and ``source`` where the SAE was loaded from.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        *,
        normalization: str = "none",
        apply_b_dec_to_input: bool = True,
        metadata: dict | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        check_size("d_in", d_in)
        check_size("d_sae", d_sae)
        check_size("k", k)
        if k > d_sae:
            raise SAEError(f"k {k} is larger than d_sae {d_sae}; k must be at most d_sae")
        if normalization not in NORMALIZATIONS:
            close = did_you_mean(str(normalization), list(NORMALIZATIONS))
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise SAEError(
                f"normalization {normalization!r} is not one diffprobe knows; {hint}use one of "
                f"{', '.join(NORMALIZATIONS)}"
            )
        metadata = dict(metadata or {})
        semantics = metadata.get("site_semantics")
        if semantics is not None and semantics not in SITE_SEMANTICS:
            raise SAEError(
                f"site_semantics {semantics!r} must be one of {', '.join(SITE_SEMANTICS)} "
                "(the block's output, its input, or output - input)"
            )
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.normalization = normalization
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.metadata = metadata
        self.feature_stats: dict[str, Tensor] = {}
        self.source: dict[str, str] = {}
        # sparsify's initialisation: encoder rows as nn.Linear draws them, the decoder a copy of
        # the encoder with unit-norm rows, zero biases (training sets b_dec to the data mean)
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(d_in)
        encoder = (
            torch.rand(d_sae, d_in, generator=generator, dtype=torch.float64) * 2 - 1
        ) * bound
        self.encoder = nn.Parameter(encoder.to(dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(self.encoder.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        self.normalize_decoder_()

    # ------------------------------------------------------------------------------ properties

    @property
    def W_enc(self) -> Tensor:
        """The encoder as SAELens writes it, ``(d_in, d_sae)``."""
        return self.encoder.T

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_sae={self.d_sae}, k={self.k}, "
            f"normalization={self.normalization!r}, site={self.metadata.get('site')!r}"
        )

    def check_d_in(self, expected: int, site: str | None = None) -> None:
        """Raise :class:`SAEError` unless this SAE reads ``expected`` channels (those of
        ``site``, named in the message)."""
        if expected == self.d_in:
            return
        where = f"site '{site}' has" if site else "the activations have"
        trained = self.metadata.get("site")
        hint = (
            f"it was trained on '{trained}'; " if trained and trained != site else ""
        ) + "use an SAE trained on that site, or train one (diffprobe sae train)"
        name = f" {self.source['path']}" if self.source.get("path") else ""
        raise SAEError(f"SAE{name} reads d_in {self.d_in} channels, but {where} {expected}; {hint}")

    # --------------------------------------------------------------------------- normalising

    def normalize(self, activations: Tensor) -> tuple[Tensor, Normalization]:
        """``(..., d_in)`` -> the SAE's input space and the per-token statistics."""
        x = activations.to(self.dtype)
        if self.normalization == "layer_norm":
            shift = x.mean(dim=-1, keepdim=True)
            x = x - shift
            scale = x.std(dim=-1, keepdim=True)
            return x / (scale + LAYER_NORM_EPS), Normalization(shift, scale)
        if self.normalization == "constant_norm_rescale":
            scale = x.norm(dim=-1, keepdim=True) / math.sqrt(self.d_in)
            return x / scale, Normalization(None, scale)
        return x, Normalization(None, None)

    def denormalize(self, values: Tensor, norm: Normalization) -> Tensor:
        """Undo :meth:`normalize` (SAELens's ``run_time_activation_norm_fn_out``)."""
        if norm.scale is not None:
            values = values * norm.scale
        if norm.shift is not None:
            values = values + norm.shift
        return values

    # ------------------------------------------------------------------------------ encoding

    def hidden(self, normalized: Tensor) -> Tensor:
        """Encoder outputs before the ReLU, ``(..., d_sae)``, of inputs already normalised."""
        if self.apply_b_dec_to_input:
            normalized = normalized - self.b_dec
        return F.linear(normalized, self.encoder, self.b_enc)

    def pre_acts(self, activations: Tensor) -> Tensor:
        """Dense ReLU pre-activations ``(..., d_sae)`` before the TopK (what the thesis scores
        features with)."""
        return torch.relu(self.hidden(self.normalize(activations)[0]))

    def encode_sparse(self, activations: Tensor) -> SparseCodes:
        """Per-token TopK codes of ``(..., d_in)`` activations: ``(..., k)`` values and
        indices."""
        return self.select_topk(self.hidden(self.normalize(activations)[0]))

    def encode(self, activations: Tensor) -> Tensor:
        """Dense codes ``(..., d_sae)``: the per-token TopK values, zeros elsewhere."""
        return self.densify(self.encode_sparse(activations))

    def select_topk(self, hidden: Tensor) -> SparseCodes:
        """Per-token TopK codes of encoder outputs ``(..., d_sae)`` (see :meth:`hidden`)."""
        # TopK of the raw encoder outputs, then the ReLU on the k values: the same codes as
        # TopK(ReLU(h)) without a pass over the whole (tokens, d_sae) matrix
        values, indices = hidden.topk(self.k, dim=-1, sorted=False)
        return SparseCodes(torch.relu(values), indices)

    def densify(self, codes: SparseCodes) -> Tensor:
        values, indices = codes
        dense = values.new_zeros(*values.shape[:-1], self.d_sae)
        return dense.scatter_(-1, indices, values)

    # ------------------------------------------------------------------------------ decoding

    def decode(self, codes: Tensor, reference: Tensor | None = None) -> Tensor:
        """Dense codes ``(..., d_sae)`` -> ``(..., d_in)``. With ``reference`` (the activations
        the codes came from) a normalising SAE maps its output back to their per-token mean
        and scale; without it the output stays in the SAE's normalised space."""
        out = codes.to(self.dtype) @ self.W_dec + self.b_dec
        return self._back(out, reference)

    def decode_sparse(self, codes: SparseCodes, reference: Tensor | None = None) -> Tensor:
        """The same as :meth:`decode` for sparse codes, without densifying them."""
        values, indices = codes
        lead = values.shape[:-1]
        out = F.embedding_bag(
            indices.reshape(-1, indices.shape[-1]),
            self.W_dec,
            per_sample_weights=values.reshape(-1, values.shape[-1]).to(self.dtype),
            mode="sum",
        )
        out = (out + self.b_dec).reshape(*lead, self.d_in)
        return self._back(out, reference)

    def _back(self, out: Tensor, reference: Tensor | None) -> Tensor:
        if reference is None or self.normalization == "none":
            return out
        return self.denormalize(out, self.normalize(reference)[1])

    def forward(self, activations: Tensor) -> SAEOutput:
        """Encode and decode ``(..., d_in)`` activations: the reconstruction (in the input's
        space) and the per-token TopK codes."""
        normalized, norm = self.normalize(activations)
        codes = self.select_topk(self.hidden(normalized))
        values, indices = codes
        flat = F.embedding_bag(
            indices.reshape(-1, self.k),
            self.W_dec,
            per_sample_weights=values.reshape(-1, self.k),
            mode="sum",
        )
        out = (flat + self.b_dec).reshape(normalized.shape)
        return SAEOutput(self.denormalize(out, norm), codes)

    # ------------------------------------------------------------------------------ decoder

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm."""
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norms.clamp_min(torch.finfo(self.dtype).tiny))

    @torch.no_grad()
    def remove_parallel_gradient_(self) -> None:
        """Remove from ``W_dec.grad`` each row's component along that (unit-norm) row, so a
        step changes directions and the renormalisation after it undoes only second-order
        growth."""
        grad = self.W_dec.grad
        if grad is None:
            return
        parallel = (grad * self.W_dec).sum(dim=1, keepdim=True)
        grad.sub_(parallel * self.W_dec)

    def describe(self) -> dict:
        """The fields ``diffprobe sae info`` prints."""
        return {
            "layout": self.source.get("layout", "memory"),
            "path": self.source.get("path"),
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "normalization": self.normalization,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "dtype": str(self.dtype).removeprefix("torch."),
            "feature_stats": sorted(self.feature_stats),
            "metadata": dict(self.metadata),
        }
