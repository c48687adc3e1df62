"""The one way tensors travel: `Tensor` messages holding raw row-major bytes."""
import math

import numpy as np
import torch

from internvl.serving.v1 import serving_pb2 as pb

DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def to_proto(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """`t` as a Tensor message, written into `out` when given (a field of a message being built: assigning a
    finished message there would copy the bytes again)."""
    out = pb.Tensor() if out is None else out
    out.dtype, out.data = DTYPE_NAMES[t.dtype], tensor_bytes(t).tobytes()
    out.shape[:] = t.shape
    return out


def from_proto(msg: pb.Tensor) -> torch.Tensor:
    """Decode a Tensor message; a wrong dtype name or byte count raises ValueError."""
    return cat_rows([(msg, msg.data)])


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's row-major bytes on the host, not copied when it is a contiguous CPU tensor (viewed as bytes:
    numpy has no bfloat16)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data


def cat_rows(parts: list[tuple[pb.Tensor, bytes | memoryview]]) -> torch.Tensor:
    """Tensors given as (header, their bytes: a message's data or a view into a cache value), of one dtype and the
    same trailing shape, concatenated along the first axis with one copy of the bytes (`from_proto` and `torch.cat`
    would make three), or none for one writable buffer (a value read from the cache, which nothing writes to): a
    view of it. A wrong dtype, a shape that differs or a byte count that does not fit raise ValueError."""
    first = parts[0][0]
    if first.dtype not in DTYPES or any(m.dtype != first.dtype for m, _ in parts):
        raise ValueError(f"tensors need one dtype of {', '.join(DTYPES)}, got {sorted({m.dtype for m, _ in parts})}")
    if any(list(m.shape[1:]) != list(first.shape[1:]) or len(m.shape) < 1 for m, _ in parts):
        raise ValueError(f"the tensors must share their trailing shape, got {[list(m.shape) for m, _ in parts]}")
    dtype, shape = DTYPES[first.dtype], (sum(m.shape[0] for m, _ in parts), *first.shape[1:])
    row = dtype.itemsize * math.prod(shape[1:])
    for msg, data in parts:
        if (size := memoryview(data).nbytes) != msg.shape[0] * row:
            raise ValueError(f"tensor of shape {list(msg.shape)} and dtype {msg.dtype} needs {msg.shape[0] * row} "
                             f"bytes, got {size}")
    data = parts[0][1]
    if len(parts) == 1 and not memoryview(data).readonly and shape[0] * row:
        return torch.frombuffer(data, dtype=dtype).view(shape)
    out = torch.empty(shape, dtype=dtype)
    flat, start = out.reshape(-1).view(torch.uint8).numpy(), 0
    for _, data in parts:
        size = memoryview(data).nbytes
        flat[start:start + size] = np.frombuffer(data, np.uint8)
        start += size
    return out
