"""Names of the elements of tuple outputs, and which one a site captures by default.

Many diffusers blocks return tuples. A site such as ``unet.down_blocks.1`` returns
``(hidden_states, res_samples)``; an SD3 ``JointTransformerBlock`` and the FLUX blocks return
``(encoder_hidden_states, hidden_states)``. Capturing a site without naming an element takes the
*default element* listed here: the stream that flows on to the next block (``hidden_states``,
the image tokens for DiT blocks). Name another element with ``site:element``, for example
``transformer.transformer_blocks.8:encoder_hidden_states`` or ``unet.down_blocks.1:res_samples``;
an integer index works too (``unet.down_blocks.1:0``).
"""

from __future__ import annotations

# class name -> names of the tuple elements, in order
TUPLE_ELEMENTS: dict[str, tuple[str, ...]] = {
    # UNet down blocks: (hidden_states, res_samples); skip variants add skip_sample.
    "DownBlock2D": ("hidden_states", "res_samples"),
    "CrossAttnDownBlock2D": ("hidden_states", "res_samples"),
    "SimpleCrossAttnDownBlock2D": ("hidden_states", "res_samples"),
    "AttnDownBlock2D": ("hidden_states", "res_samples"),
    "ResnetDownsampleBlock2D": ("hidden_states", "res_samples"),
    "KDownBlock2D": ("hidden_states", "res_samples"),
    "KCrossAttnDownBlock2D": ("hidden_states", "res_samples"),
    "SkipDownBlock2D": ("hidden_states", "res_samples", "skip_sample"),
    "AttnSkipDownBlock2D": ("hidden_states", "res_samples", "skip_sample"),
    # MMDiT / FLUX blocks: (encoder_hidden_states, hidden_states)
    "JointTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
}

DEFAULT_ELEMENT: dict[str, str] = {name: "hidden_states" for name in TUPLE_ELEMENTS}


def element_index(class_name: str, element: str | int | None, length: int) -> int:
    """Index into a tuple output of ``length`` elements returned by a module of ``class_name``.

    ``element`` is a name from :data:`TUPLE_ELEMENTS`, an integer, or ``None`` for the default.
    Raises ``KeyError`` with the valid choices when the element does not exist.
    """
    names = TUPLE_ELEMENTS.get(class_name)
    if element is None:
        if names is None:
            return 0
        return names.index(DEFAULT_ELEMENT[class_name])
    if isinstance(element, int) or (isinstance(element, str) and element.lstrip("-").isdigit()):
        index = int(element)
        if not -length <= index < length:
            raise KeyError(
                f"element {index} does not exist: {class_name} returns a tuple of {length}"
                + (f" ({', '.join(names)})" if names else "")
            )
        return index % length
    if names is None or element not in names:
        choices = ", ".join(names) if names else ", ".join(str(i) for i in range(length))
        raise KeyError(
            f"element {element!r} does not exist for {class_name}; it returns ({choices})"
        )
    return names.index(element)
