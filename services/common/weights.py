"""Reading a checkpoint's tensors into torch modules, and the start-up shared by the services that hold a model.

Each service reads only the tensors it runs, shard by shard.
"""
import argparse
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from services.common import settings
from services.common.checkpoint import (WEIGHT_FILES, CheckpointError, ModelConfig, canonical_name, read_model_config,
                                       resolve_checkpoint)


class TensorReader:
    """Lazy access to a checkpoint's tensors (safetensors or .bin, single file or sharded with an index)."""

    def __init__(self, path: Path):
        for index_name, single_name in WEIGHT_FILES:
            if (path / index_name).exists():
                stored = json.loads((path / index_name).read_text())["weight_map"]
                break
            if (path / single_name).exists():
                stored = dict.fromkeys(_load(path / single_name), single_name)
                break
        else:
            raise CheckpointError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")
        self.path = path
        self.weight_map = {canonical_name(name): (file, name) for name, file in stored.items()}

    def tensors(self, wanted: Callable[[str], bool], desc: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for the wanted names, opening each shard once, with a progress bar."""
        by_file: dict[str, list[tuple[str, str]]] = {}
        for name, (file, stored) in self.weight_map.items():
            if wanted(name):
                by_file.setdefault(file, []).append((name, stored))
        with tqdm(total=sum(map(len, by_file.values())), desc=f"loading {desc}", unit="tensor", mininterval=1) as bar:
            for file, names in sorted(by_file.items()):
                tensors = _load(self.path / file)
                for name, stored in names:
                    yield name, tensors[stored]
                    bar.update()


def _load(file: Path):
    """A shard's tensors by name, read lazily (safetensors) or memory-mapped (.bin, without running pickled code)."""
    if file.suffix == ".safetensors":
        return _SafetensorsShard(file)
    return torch.load(file, map_location="cpu", mmap=True, weights_only=True)


class _SafetensorsShard:
    def __init__(self, file: Path):
        self.handle = safe_open(file, "pt")

    def __iter__(self):
        return iter(self.handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)


# Maps a checkpoint tensor (name without the part's prefix, tensor) to the (parameter, shard, tensor) it fills:
# none to skip it, several when one stored tensor feeds several shards (InternLM2's grouped wqkv).
Rename = Callable[[str, torch.Tensor], list[tuple[str, object, torch.Tensor]]]


def load_weights(module: torch.nn.Module, reader: TensorReader, prefix: str, rename: Rename) -> None:
    """Copy the tensors under `prefix` into `module`'s parameters.

    A parameter whose module has `load_shard` (fused q/k/v, gate/up) is filled shard by shard; every parameter and
    every shard must be filled, else the error names what the checkpoint lacks.
    """
    params = dict(module.named_parameters())
    filled: set[tuple[str, object]] = set()
    for name, stored in reader.tensors(lambda n: n.startswith(prefix), desc=prefix):
        for param_name, shard, tensor in rename(name[len(prefix):], stored):
            if param_name not in params:
                raise CheckpointError(f"checkpoint tensor {name} maps to unknown parameter {param_name}")
            param, owner = params[param_name], _owner(module, param_name)
            with torch.no_grad():
                if shard is not None:
                    try:
                        owner.load_shard(param, tensor, shard)
                    except ValueError as e:  # a shard of the wrong shape
                        raise CheckpointError(f"{name}: {e}") from e
                elif param.shape != tensor.shape:
                    raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
                else:
                    param.copy_(tensor)
            filled.add((param_name, shard))
    expected = {(n, s) for n in params for s in getattr(_owner(module, n), "shards", (None,))}
    missing = sorted(f"{prefix}{n}[{s}]" if s is not None else prefix + n for n, s in expected - filled)
    if missing:
        raise CheckpointError(f"{reader.path}: checkpoint is missing tensors for {', '.join(missing[:8])}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def same_name(name: str, tensor: torch.Tensor) -> list[tuple[str, object, torch.Tensor]]:
    """The identity mapping: a tensor fills the parameter of the same name."""
    return [(name, None, tensor)]


def _owner(module: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return module.get_submodule(param_name.rpartition(".")[0])


def weights_fingerprint(module: torch.nn.Module, checkpoint: str) -> str:
    """Identifies loaded weights from a strided sample of every tensor: cheap even for 6B parameters, and different
    for any two checkpoints that differ in more than a few isolated values (fine-tunes, other seeds)."""
    h = hashlib.sha256(checkpoint.encode())
    for name, p in sorted(module.named_parameters()):
        flat = p.detach().flatten()
        sample = flat[::max(1, flat.numel() // 4096)].float().cpu()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    settings.add(parser, "--model", "MODEL", None, "hub id or local checkpoint directory")
    settings.add(parser, "--device", "DEVICE", "cuda" if torch.cuda.is_available() else "cpu", "torch device")
    settings.add(parser, "--dtype", "DTYPE", "auto",
                 "bfloat16, float16, float32 or auto (on the GPU bfloat16, float16 for AWQ checkpoints; on the CPU "
                 "float32)")
    settings.add(parser, "--cpu-threads", "CPU_THREADS", 0,
                 "torch's intra-op threads (0 = torch's default, one per core); services sharing a machine's cores "
                 "should split them, or each thread pool spins against the others", int)


def torch_dtype(name: str, device: str, awq: bool = False) -> torch.dtype:
    """The compute dtype `name` means on `device`. An AWQ checkpoint is fp16 throughout (fp16 scales, unquantized
    parts), and LMDeploy, which made InternVL2_5-4B-AWQ, and vLLM serve AWQ in fp16."""
    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.float16 if awq else torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def open_checkpoint(args: argparse.Namespace, parts: tuple[str, ...]) -> tuple[Path, ModelConfig, torch.dtype]:
    """Start-up shared by the GPU services: logging, the checkpoint (with `parts`' tensors) and the compute dtype."""
    settings.setup_logging()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if not args.model:
        raise SystemExit("--model (or MODEL) is required")
    path = resolve_checkpoint(args.model, parts)
    cfg = read_model_config(path)
    return path, cfg, torch_dtype(args.dtype, args.device, awq=bool(cfg.text.awq_group_size))
