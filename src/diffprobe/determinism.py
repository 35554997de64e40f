"""Batch-invariant computation: the same item gives the same bits at any batch size.

Convolution and matrix-multiply kernels choose their algorithm, blocking and threading from the
shape of the whole batch (oneDNN on the CPU, cuDNN and cuBLAS on GPUs), so item ``i`` computed in
a batch of 16 can differ from item ``i`` computed alone in the last bits (about 1e-6 of the
value on ``tiny``). Position in the batch and the other items do not matter; the batch size does.

:func:`batch_invariant` removes that dependence by running every ``conv2d`` and ``linear`` one
item at a time (slices along the batch axis, then one concatenation), so the kernel always sees
a batch of one; group norms too, on a contiguous copy (their CPU kernel takes another path
for a channels-last layout, which a transposed batch of one can look like). Layer norms,
attention, activations and element-wise operations work on each item apart already. The price
is speed (``docs/performance.md``). ``diffprobe extract --batch-invariant`` turns it on for a run.

    >>> import torch
    >>> from diffprobe.determinism import batch_invariant
    >>> conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    >>> x = torch.randn(16, 8, 12, 12)
    >>> with torch.no_grad(), batch_invariant():
    ...     together, alone = conv(x), torch.cat([conv(x[i : i + 1]) for i in range(16)])
    >>> bool(torch.equal(together, alone))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["batch_invariant"]

# functions whose kernel depends on the batch size, and the rank their input has when batched
_PER_ITEM = {F.conv1d: 3, F.conv2d: 4, F.conv3d: 5, F.linear: 2, F.group_norm: 3}


class _OneItemAtATime(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rank = _PER_ITEM.get(func)
        if rank is not None and args:
            inputs = args[0]
            if isinstance(inputs, torch.Tensor) and inputs.dim() >= rank:
                # Inside __torch_function__ this mode is off, so func runs the real kernel.
                # contiguous(), batch of one or not: a kernel may take another path for another
                # memory layout (a permuted uint8 image batch is channels-last, for instance).
                outputs = [func(inputs[i : i + 1].contiguous(), *args[1:], **kwargs)
                           for i in range(len(inputs))]  # fmt: skip
                return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread only), convolutions, linear layers and group norms run one
    batch item at a time; ``enabled=False`` makes it a no-op."""
    if not enabled:
        yield
        return
    with _OneItemAtATime():
        yield
