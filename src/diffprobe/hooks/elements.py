"""Names of the elements of tuple outputs, and which one a site captures by default.

Many diffusers blocks return tuples. A site such as ``unet.down_blocks.1`` returns
``(hidden_states, res_samples)``; an SD3 ``JointTransformerBlock`` and the FLUX blocks return
``(encoder_hidden_states, hidden_states)``. Each family's adapter declares the names of its
block classes' elements (``Model.tuple_elements``); this module asks the registered adapters
(:func:`diffprobe.registry.tuple_elements`). Capturing a site without naming an element takes
the *default element*: ``hidden_states``, the stream that flows on to the next block (the image
tokens for DiT blocks), or the first element of a tuple no adapter names. Name another element
with ``site:element``, for example ``transformer.transformer_blocks.8:encoder_hidden_states`` or
``unet.down_blocks.1:res_samples``; an integer index works too (``unet.down_blocks.1:0``).
"""

from __future__ import annotations

from diffprobe import registry

DEFAULT_ELEMENT = "hidden_states"


def element_names(class_name: str) -> tuple[str, ...] | None:
    """The names of the tuple elements a module of ``class_name`` returns, as its family's
    adapter declares them; None when no registered adapter names them."""
    return registry.tuple_elements(class_name)


def element_index(class_name: str, element: str | int | None, length: int) -> int:
    """Index into a tuple output of ``length`` elements returned by a module of ``class_name``.

    ``element`` is a name from :func:`element_names`, an integer, or ``None`` for the default.
    Raises ``KeyError`` with the valid choices when the element does not exist.
    """
    names = element_names(class_name)
    if element is None:
        if names is None or DEFAULT_ELEMENT not in names:
            return 0
        return names.index(DEFAULT_ELEMENT)
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
