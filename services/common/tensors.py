"""The one way tensors travel: `Tensor` messages holding raw row-major bytes."""
import torch

from internvl.serving.v1 import serving_pb2 as pb

DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def to_proto(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().contiguous().cpu()
    # Viewing as bytes keeps bfloat16 intact (numpy has no bfloat16).
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return pb.Tensor(dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), data=data)


def from_proto(msg: pb.Tensor) -> torch.Tensor:
    """Decode a Tensor message; a wrong dtype name or byte count raises ValueError."""
    if msg.dtype not in DTYPES:
        raise ValueError(f"unsupported tensor dtype {msg.dtype!r}")
    dtype, shape = DTYPES[msg.dtype], tuple(msg.shape)
    expected = dtype.itemsize
    for d in shape:
        expected *= d
    if len(msg.data) != expected:
        raise ValueError(f"tensor of shape {shape} and dtype {msg.dtype} needs {expected} bytes, got {len(msg.data)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)
