"""The single host copy from a source tensor (any layout) into a jax array."""

from __future__ import annotations

from typing import Any

import numpy as np

from vgg_flax.convert.readers import FileTensor


def to_device(value: Any, dtype: Any, layout=None, shape: tuple[int, ...] | None = None) -> Any:
    """`layout(np.asarray(value)).reshape(shape)` as a jax array of `dtype`, with a single copy.

    `layout` is None (keep the layout) or a transpose that moves the source's first axis last (as
    every conversion rule does). The copy goes block by block of source rows (a `FileTensor` is
    read block by block too, so the source never exists whole), which also keeps the big fc1
    transpose cache-friendly. The destination is a 64-byte aligned host buffer that jax's CPU
    backend adopts without copying again (on accelerators it is the one host-to-device transfer).
    """
    import jax

    source = value if isinstance(value, FileTensor) else np.asarray(value)
    if source.ndim == 0:
        return jax.device_put(np.asarray(source, dtype))
    dtype = np.dtype(dtype)
    out_shape = source.shape if layout is None else layout(np.empty(source.shape, np.bool_)).shape
    nbytes = int(np.prod(out_shape)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = (-raw.ctypes.data) % 64
    dst = raw[offset:offset + nbytes].view(dtype).reshape(out_shape)
    row_bytes = max(1, int(np.prod(source.shape[1:]))) * source.dtype.itemsize
    step = max(1, (2 << 20) // row_bytes)  # ~2 MiB of source per block
    for start in range(0, source.shape[0], step):
        stop = min(start + step, source.shape[0])
        block = source.rows(start, stop) if isinstance(source, FileTensor) else source[start:stop]
        if layout is None:
            dst[start:stop] = block
            continue
        # Permute within rows first (contiguous, row-local), then one strided 2-D style copy.
        block = np.ascontiguousarray(np.moveaxis(layout(block), -1, 0))
        dst[..., start:stop] = np.moveaxis(block, 0, -1)
    return jax.device_put(dst if shape is None else dst.reshape(shape))
