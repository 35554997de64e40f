"""Diffusion Lens (Toker et al.): images generated from every intermediate text-encoder layer.

The text encoder of a text-to-image pipeline is cut after layer ``ℓ``; what it holds there is read
out the way the pipeline reads its own layer, put in place of that encoder's part of the
pipeline's ``prompt_embeds``, and the native pipeline generates from it. Nothing is patched: the
full embeddings come from the pipeline's own ``encode_prompt`` (through the model adapter), every
layer's hidden states from ``Model.encode_text``, and the pipeline is called with
``prompt_embeds=`` (and ``pooled_prompt_embeds=``, ``negative_prompt_embeds=`` ...).

Semantics (``docs/lens.md`` has the table per family; ``lens.json`` repeats them per run):

- **Layer index.** Layer ``ℓ`` of an encoder is ``hidden_states[ℓ]``: the output of its first
  ``ℓ`` blocks (``0`` is the token embeddings, before any block), as in Toker et al.'s code.
  The nnsight tutorial numbers blocks (``encoder.layers[ℓ].output``), so its layer ``ℓ`` is
  diffprobe's ``ℓ + 1`` (diffprobe's ``ℓ`` is the tutorial's ``ℓ - 1``). The valid layers run from 0 to
  the layer the pipeline itself reads, so the *last lens layer reproduces the normal generation*
  bit for bit: ``L`` for SD 1.x/2.x CLIP and for every T5, ``L - 1`` for the CLIP encoders of
  SDXL and SD3/3.5, which read ``hidden_states[-2]``.
- **Readout** (``norm="pipeline"``, the default): the pipeline's own readout applied to layer
  ``ℓ``. CLIP read from ``last_hidden_state`` (SD 1.x/2.x): the encoder's final layer norm,
  ``final_layer_norm(hidden_states[ℓ])``. CLIP read from ``hidden_states[-2]`` (SDXL, SD3): no
  norm, as the pipeline. T5 (SD3, FLUX, IF): the final norm on every layer but the last, which
  is already normalised. ``norm="final"`` applies the final layer norm at every CLIP layer
  (``0 .. L``), also for SDXL and SD3 (whose last lens layer then does not reproduce the normal
  generation).
- **Pooled vectors** (SDXL, SD3, FLUX) come from the full encoders (``pooled="full"``, the
  default for SDXL and SD3). ``pooled="empty"`` (the default when FLUX's T5 is lensed, as Toker
  et al.'s FLUX notebook) uses the pooled vector of the empty prompt at every layer below the
  last, so no final-layer text reaches the image through it; the last layer keeps the full one
  and still reproduces the normal generation. ``pooled="lens"`` computes the lensed encoder's pooled vector from layer ``ℓ`` as
  CLIP does from its last layer: final layer norm, end-of-text token, ``text_projection`` when
  the encoder has one. FLUX reads nothing but the pooled vector of its CLIP encoder, so lensing
  it needs ``pooled="lens"``.
- **Other encoders** of dual and triple-encoder pipelines are not lensed: their part of the
  embeddings is the full encoder's. ``encoder=`` picks the lensed one.
- **Only the conditional branch is lensed.** The unconditional branch of classifier-free
  guidance is what the pipeline uses by default (the full encoding of ``""``; zeros for SDXL
  base, ``force_zeros_for_empty_prompt``).
- **Same noise for every layer.** Image (layer, seed ``s``) is generated with a fresh
  ``torch.Generator("cpu").manual_seed(s)``, exactly as ``model.generate(seed=s)``, so all
  layers start from the same initial noise (and draw the same sampler noise) and differ only by
  the conditioning.
- **Padding** tokens (every position after the first end-of-text token) keep the lensed layer's
  states (``padding="keep"``, the default), or take the full encoder's (``padding="full"``).

    import diffprobe
    from diffprobe.lens import lens
    result = lens(diffprobe.load("tiny"), "a red circle in the top left", seeds=[0, 1])
    result.save("runs/lens")   # one PNG per (layer, seed), grid.png, lens.json
"""

from diffprobe.interventions.lens import (
    NORMS,
    PADDING,
    POOLED,
    LensEmbeddings,
    LensError,
    Tower,
    generate_from,
    lens_embeddings,
    lens_layers,
    parse_layers,
    towers,
)
from diffprobe.report.lens import plot_emergence
from diffprobe.stages.lens import (
    EMERGENCE_ATTRIBUTES,
    LENS_KIND,
    EmergenceResult,
    LensResult,
    demo,
    emergence,
    emergence_accuracy,
    lens,
)

__all__ = [
    "EMERGENCE_ATTRIBUTES",
    "LENS_KIND",
    "NORMS",
    "PADDING",
    "POOLED",
    "EmergenceResult",
    "LensEmbeddings",
    "LensError",
    "LensResult",
    "Tower",
    "demo",
    "emergence",
    "emergence_accuracy",
    "generate_from",
    "lens",
    "lens_embeddings",
    "lens_layers",
    "parse_layers",
    "plot_emergence",
    "towers",
]
