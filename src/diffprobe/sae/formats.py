"""SAE files: diffprobe writes the SAELens layout and reads three (docs/sae.md).

============  ==========================================  ==================================
layout        files                                       tensors
============  ==========================================  ==================================
``saelens``   ``cfg.json`` + ``sae_weights.safetensors``  W_enc (d_in, d_sae), W_dec
                                                          (d_sae, d_in), b_enc, b_dec
``sparsify``  ``cfg.json`` + ``sae.safetensors``          encoder.weight (d_sae, d_in),
              (EleutherAI sparsify, SAeUron; one folder   encoder.bias, W_dec (d_sae, d_in),
              per hookpoint)                              b_dec
``openai``    ``config.json`` + ``state_dict.pth``        pre_bias (b_dec), latent_bias
              (+ ``mean.pt``, ``std.pt``; sdxl-unbox)     (b_enc), encoder.weight (d_sae,
                                                          d_in), decoder.weight (d_in, d_sae)
============  ==========================================  ==================================

How each maps onto :class:`~diffprobe.sae.model.TopKSAE` (read from those projects' source):

- SAELens: ``apply_b_dec_to_input`` and ``normalize_activations`` as written; a
  ``rescale_acts_by_decoder_norm`` SAE is folded (encoder rows and b_enc x decoder norms,
  decoder rows / norms), which gives the same codes and reconstructions.
- sparsify and SAeUron subtract ``b_dec`` before encoding, always (``SparseCoder.encode``):
  ``apply_b_dec_to_input`` is True whatever ``normalize_decoder`` says (SAELens's converter
  sets it to ``not normalize_decoder``). SAeUron's ``input_unit_norm`` (per-token mean 0,
  unbiased std 1 with eps 1e-5, undone on the output) is SAELens's ``layer_norm``.
  ``batch_topk`` / ``sample_topk`` are training modes: inference is per-token TopK, as
  SAeUron's loader does.
- openai / sdxl-unbox: ``encoder(x - pre_bias) + latent_bias``, TopK, ReLU, ``decoder(z) +
  pre_bias``; ``mean.pt`` / ``std.pt`` are per-latent activation statistics (feature_stats,
  used to scale edits), not an input normalisation. ``state_dict.pth`` is read with
  ``torch.load(weights_only=True)``: tensors only, never arbitrary pickled objects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffprobe.errors import did_you_mean
from diffprobe.sae.model import NORMALIZATIONS, SAEError, TopKSAE

LAYOUTS = ("saelens", "sparsify", "openai")
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
OPENAI_CFG = "config.json"
OPENAI_WEIGHTS = "state_dict.pth"
FEATURE_STATS = "feature_stats.safetensors"
# sdxl-unbox checkpoint folders: <site>_k10_hidden5120_auxk256_bs4096_lr0.0001/final
_UNBOX_FOLDER = re.compile(r"^(?P<site>.+?)_k\d+_hidden\d+")


class SAEFormatError(SAEError):
    """An SAE file or folder diffprobe cannot read."""


# ------------------------------------------------------------------------------------ saving


def save_sae(
    sae: TopKSAE, folder: str | Path, *, overwrite: bool = False, claim: bool = True
) -> Path:
    """Write ``sae`` to ``folder`` in the SAELens layout: ``cfg.json`` (architecture
    ``topk``, d_in, d_sae, k, normalize_activations, apply_b_dec_to_input, metadata) and
    ``sae_weights.safetensors`` (W_enc ``(d_in, d_sae)``, W_dec ``(d_sae, d_in)``, b_enc,
    b_dec), plus ``feature_stats.safetensors`` when the SAE has per-latent statistics."""
    from safetensors.torch import save

    from diffprobe.io import claim_output, versions, write_bytes, write_json

    folder = Path(folder)
    if claim:
        entries = (SAELENS_CFG, SAELENS_WEIGHTS) + ((FEATURE_STATS,) if sae.feature_stats else ())
        claim_output(folder, "sae", overwrite=overwrite, entries=entries)
    metadata = {**sae.metadata, "diffprobe_version": versions()["diffprobe"]}
    if metadata.get("site") and not metadata.get("hook_name"):
        metadata["hook_name"] = metadata["site"]
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalization,
        "reshape_activations": "none",
        "metadata": metadata,
    }
    weights = {
        "W_enc": sae.W_enc,
        "W_dec": sae.W_dec,
        "b_enc": sae.b_enc,
        "b_dec": sae.b_dec,
    }
    write_bytes(folder / SAELENS_WEIGHTS, save(_cpu(weights)))
    if sae.feature_stats:
        write_bytes(folder / FEATURE_STATS, save(_cpu(sae.feature_stats)))
    write_json(folder / SAELENS_CFG, cfg)
    return folder


def _cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


# ----------------------------------------------------------------------------------- loading


def detect_layout(folder: Path) -> str | None:
    if (folder / SAELENS_CFG).is_file() and (folder / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (folder / SAELENS_CFG).is_file() and (folder / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if (folder / OPENAI_CFG).is_file() and (folder / OPENAI_WEIGHTS).is_file():
        return "openai"
    return None


def load_sae(
    path: str | Path,
    *,
    layout: str | None = None,
    hookpoint: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TopKSAE:
    """Load the SAE at ``path`` (its folder, or a file in it) in any supported layout,
    detected from the files or given as ``layout``. A folder of several hookpoints (a
    sparsify/SAeUron hub snapshot) needs ``hookpoint``, the subfolder's name."""
    path = Path(path).expanduser()
    if layout is not None and layout not in LAYOUTS:
        close = did_you_mean(str(layout), list(LAYOUTS))
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SAEFormatError(
            f"unknown SAE layout {layout!r}; {hint}use one of {', '.join(LAYOUTS)}"
        )
    if not path.exists():
        raise SAEFormatError(f"SAE path {path} does not exist; pass the folder of an SAE")
    folder = path if path.is_dir() else path.parent
    if not path.is_dir() and detect_layout(folder) is None:
        raise SAEFormatError(
            f"SAE path {path} is a file, not an SAE folder; pass the folder that holds "
            "cfg.json (saelens, sparsify) or config.json (openai)"
        )
    if hookpoint is not None:
        inner = folder / hookpoint
        if not inner.is_dir():
            found = _candidates(folder)
            raise SAEFormatError(
                f"{folder} has no hookpoint folder '{hookpoint}'"
                + (f"; it has {', '.join(found)}" if found else "")
            )
        folder = inner
    found_layout = layout or detect_layout(folder)
    if found_layout is None:
        candidates = _candidates(folder)
        if len(candidates) == 1:
            return load_sae(folder / candidates[0], layout=layout, device=device, dtype=dtype)
        if candidates:
            raise SAEFormatError(
                f"{folder} holds {len(candidates)} SAEs ({', '.join(candidates[:6])}"
                f"{' ...' if len(candidates) > 6 else ''}); pick one with hookpoint=NAME "
                "(--hookpoint NAME)"
            )
        raise SAEFormatError(
            f"{folder} holds no SAE in a layout diffprobe reads: it looked for cfg.json + "
            f"{SAELENS_WEIGHTS} (saelens), cfg.json + {SPARSIFY_WEIGHTS} (sparsify/SAeUron) "
            f"and {OPENAI_CFG} + {OPENAI_WEIGHTS} (openai/sdxl-unbox); pass the folder of one SAE"
        )
    if layout is not None:
        needed = {"saelens": (SAELENS_CFG, SAELENS_WEIGHTS),
                  "sparsify": (SAELENS_CFG, SPARSIFY_WEIGHTS),
                  "openai": (OPENAI_CFG, OPENAI_WEIGHTS)}[layout]  # fmt: skip
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            other = detect_layout(folder)
            raise SAEFormatError(
                f"{folder} is not in the {layout} layout: {', '.join(missing)} missing"
                + (f" (it holds the {other} layout: leave out --layout)" if other else "")
            )
    reader = {"saelens": _load_saelens, "sparsify": _load_sparsify, "openai": _load_openai}
    sae = reader[found_layout](folder)
    sae.source = {"layout": found_layout, "path": str(folder)}
    return sae.to(device=device, dtype=dtype)


def _candidates(folder: Path) -> list[str]:
    """Subfolders (two levels deep) holding an SAE in any layout."""
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        if detect_layout(child):
            found.append(child.name)
        else:
            found += [f"{child.name}/{g.name}" for g in sorted(child.iterdir())
                      if g.is_dir() and detect_layout(g)]  # fmt: skip
    return found


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SAEFormatError(f"{path} is missing; the SAE folder is incomplete")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SAEFormatError(f"{path} is not valid JSON ({err}); download the SAE again") from None
    if not isinstance(value, dict):
        raise SAEFormatError(f"{path} holds {type(value).__name__}, not a JSON object")
    return value


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise SAEFormatError(f"{path} is missing; the SAE folder is incomplete")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SAEFormatError(
            f"{path} is not a readable safetensors file ({' '.join(str(err).split())}); it is "
            "damaged or truncated: download or save the SAE again"
        ) from None


def _read_torch(path: Path) -> Any:
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "not tensors"
        raise SAEFormatError(
            f"{path} holds objects other than tensors ({first}); diffprobe reads .pth files "
            "with torch.load(weights_only=True) only: re-save the state dict as plain tensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise SAEFormatError(
            f"{path} is not a readable torch file ({' '.join(str(err).split())[:200]}); it is "
            "damaged or truncated: download the SAE again"
        ) from None


def _integer(cfg: dict, key: str, where: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SAEFormatError(f"{where}: '{key}' is {value!r}; expected a positive integer")
    return value


def _tensor(
    tensors: dict, name: str, shape: tuple[int, ...], where: Path, note: str = ""
) -> Tensor:
    if name not in tensors:
        raise SAEFormatError(
            f"{where} lacks tensor '{name}' (it has {', '.join(sorted(tensors)) or 'none'}); "
            "it is not an SAE of this layout (pass layout=...)"
        )
    value = tensors[name]
    if not isinstance(value, Tensor):
        raise SAEFormatError(f"{where}: '{name}' is {type(value).__name__}, not a tensor")
    if tuple(value.shape) != shape:
        raise SAEFormatError(
            f"{where}: tensor '{name}' has shape {list(value.shape)}, but the config gives "
            f"{list(shape)}{note}; config and weights do not belong together"
        )
    return value.to(torch.float32)


def _build(d_in: int, d_sae: int, k: int, where: Path, **kwargs: Any) -> TopKSAE:
    if d_in < 1 or d_sae < 1:
        raise SAEFormatError(f"{where}: d_in {d_in} and d_sae {d_sae} must be at least 1")
    if not 1 <= k <= d_sae:
        raise SAEFormatError(
            f"{where}: k {k} must be between 1 and d_sae {d_sae} (the latents); the config is wrong"
        )
    return TopKSAE(d_in, d_sae, k, **kwargs)


def _assign(sae: TopKSAE, encoder: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor) -> TopKSAE:
    with torch.no_grad():
        sae.encoder.copy_(encoder)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
    return sae


def _load_saelens(folder: Path) -> TopKSAE:
    cfg_path = folder / SAELENS_CFG
    cfg = _read_json(cfg_path)
    architecture = cfg.get("architecture", "standard")
    if architecture != "topk":
        raise SAEFormatError(
            f"{cfg_path}: architecture {architecture!r}; diffprobe reads TopK SAEs "
            "(architecture 'topk')"
        )
    d_in, d_sae = _integer(cfg, "d_in", cfg_path), _integer(cfg, "d_sae", cfg_path)
    k = _integer(cfg, "k", cfg_path)
    normalization = cfg.get("normalize_activations") or "none"
    if normalization not in NORMALIZATIONS:
        raise SAEFormatError(
            f"{cfg_path}: normalize_activations {normalization!r} needs a scaling factor that "
            f"is not in the folder; diffprobe reads {', '.join(NORMALIZATIONS)}"
        )
    metadata = cfg.get("metadata") or cfg.get("meta") or {}
    if not isinstance(metadata, dict):
        metadata = {}
    if metadata.get("hook_name") and not metadata.get("site"):
        metadata["site"] = metadata["hook_name"]
    sae = _build(d_in, d_sae, k, cfg_path, normalization=normalization,
                 apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                 metadata=_known_semantics(metadata))  # fmt: skip
    weights_path = folder / SAELENS_WEIGHTS
    tensors = _read_safetensors(weights_path)
    W_enc = _tensor(tensors, "W_enc", (d_in, d_sae), weights_path, " (d_in, d_sae)")
    W_dec = _tensor(tensors, "W_dec", (d_sae, d_in), weights_path, " (d_sae, d_in)")
    b_enc = _tensor(tensors, "b_enc", (d_sae,), weights_path)
    b_dec = _tensor(tensors, "b_dec", (d_in,), weights_path)
    encoder = W_enc.T
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=1)
        encoder, b_enc, W_dec = encoder * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    _assign(sae, encoder, b_enc, W_dec, b_dec)
    stats = folder / FEATURE_STATS
    if stats.is_file():
        sae.feature_stats = {k: v for k, v in _read_safetensors(stats).items()
                             if tuple(v.shape) == (d_sae,)}  # fmt: skip
    return sae


def _known_semantics(metadata: dict) -> dict:
    from diffprobe.sae.model import SITE_SEMANTICS

    if metadata.get("site_semantics") not in (None, *SITE_SEMANTICS):
        metadata = {k: v for k, v in metadata.items() if k != "site_semantics"}
    return metadata


def _load_sparsify(folder: Path) -> TopKSAE:
    cfg_path = folder / SAELENS_CFG
    cfg = _read_json(cfg_path)
    for key, why in (("transcode", "a transcoder"), ("skip_connection", "a skip connection")):
        if cfg.get(key):
            raise SAEFormatError(f"{cfg_path}: {why} ({key}: true) is not an SAE diffprobe reads")
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(
            f"{cfg_path}: activation {cfg.get('activation')!r}; diffprobe reads TopK SAEs"
        )
    d_in = _integer(cfg, "d_in", cfg_path)
    d_sae = cfg.get("num_latents") or d_in * _integer(cfg, "expansion_factor", cfg_path)
    k = _integer(cfg, "k", cfg_path)
    metadata = {"site": folder.name, "hook_name": folder.name} if "." in folder.name else {}
    metadata["trained_with"] = {
        key: cfg[key] for key in ("batch_topk", "sample_topk", "multi_topk") if key in cfg
    }
    sae = _build(d_in, int(d_sae), k, cfg_path, metadata=metadata,
                 normalization="layer_norm" if cfg.get("input_unit_norm") else "none")  # fmt: skip
    weights_path = folder / SPARSIFY_WEIGHTS
    tensors = _read_safetensors(weights_path)
    return _assign(
        sae,
        _tensor(tensors, "encoder.weight", (d_sae, d_in), weights_path, " (num_latents, d_in)"),
        _tensor(tensors, "encoder.bias", (d_sae,), weights_path),
        _tensor(tensors, "W_dec", (d_sae, d_in), weights_path, " (num_latents, d_in)"),
        _tensor(tensors, "b_dec", (d_in,), weights_path),
    )


def _load_openai(folder: Path) -> TopKSAE:
    cfg_path = folder / OPENAI_CFG
    cfg = _read_json(cfg_path)
    d_sae = _integer(cfg, "n_dirs_local", cfg_path)
    d_in = _integer(cfg, "d_model", cfg_path)
    k = _integer(cfg, "k", cfg_path)
    metadata: dict = {}
    named = _UNBOX_FOLDER.match(folder.parent.name if folder.name == "final" else folder.name)
    if named:
        # sdxl-unbox names its folders by the site and trains on output - input
        metadata = {"site": named["site"], "hook_name": named["site"], "site_semantics": "delta"}
    sae = _build(d_in, d_sae, k, cfg_path, metadata=metadata,
                 normalization="layer_norm" if cfg.get("normalize") else "none")  # fmt: skip
    weights_path = folder / OPENAI_WEIGHTS
    loaded = _read_torch(weights_path)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise SAEFormatError(
            f"{weights_path} holds {type(loaded).__name__}; expected a state dict (or "
            "{'state_dict': ...}) of tensors"
        )
    _assign(
        sae,
        _tensor(state, "encoder.weight", (d_sae, d_in), weights_path, " (n_dirs_local, d_model)"),
        _tensor(state, "latent_bias", (d_sae,), weights_path),
        _tensor(state, "decoder.weight", (d_in, d_sae), weights_path, " (d_model, n_dirs_local)").T,
        _tensor(state, "pre_bias", (d_in,), weights_path),
    )
    for name in ("mean", "std"):
        path = folder / f"{name}.pt"
        if path.is_file():
            value = _read_torch(path)
            if not isinstance(value, Tensor) or value.numel() != d_sae:
                raise SAEFormatError(
                    f"{path} holds {getattr(value, 'shape', type(value).__name__)}; expected "
                    f"{d_sae} per-latent values"
                )
            sae.feature_stats[name] = value.reshape(d_sae).to(torch.float32)
    return sae
