"""What the committed kernel tables (AWQ GEMM, dense GEMV) are keyed by, classes of GPUs tuned alike, and the compile
options they were tuned under."""
import functools
import os
from pathlib import Path

import torch

# What every Triton kernel of the project is compiled with, served and tuned alike. Floating-point contraction
# (a * b + c as one FMA) is Triton's default up to 3.9 and off from 3.10 unless a launch asks for it: asked for here,
# so a newer Triton runs the kernels the tables were tuned with, not slower ones that round otherwise.
TRITON_OPTIONS = {"enable_fp_fusion": True}

# A GPU whose name contains one of the strings is of that class; any other is "default".
DEVICE_CLASSES = {"H100/H200": ("H100", "H200")}


def device_class(name: str) -> str:
    return next((cls for cls, keys in DEVICE_CLASSES.items() if any(k in name for k in keys)), "default")


def table_file(committed: Path, variable: str) -> Path:
    """The table in use: the file the environment variable names (e.g. one a tuning run just wrote), else the
    committed one."""
    return Path(os.environ.get(variable) or committed)


@functools.cache
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
