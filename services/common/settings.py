"""Settings: every flag also reads an environment variable, so the same image runs locally and in Kubernetes."""
import argparse
import logging
import os
from pathlib import Path

import torch

from services.common.checkpoint import ModelConfig, read_model_config, resolve_checkpoint


def add(parser: argparse.ArgumentParser, flag: str, env: str, default, help: str, type=str) -> None:
    parser.add_argument(flag, type=type, default=type(os.environ[env]) if env in os.environ else default,
                        help=f"{help} [env {env}, default {default}]")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    add(parser, "--model", "MODEL", None, "hub id or local checkpoint directory")
    add(parser, "--device", "DEVICE", "cuda" if torch.cuda.is_available() else "cpu", "torch device")
    add(parser, "--dtype", "DTYPE", "auto", "bfloat16, float16, float32 or auto (bfloat16 on GPU, float32 on CPU)")


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def open_checkpoint(args: argparse.Namespace, parts: tuple[str, ...]) -> tuple[Path, ModelConfig, torch.dtype]:
    """Start-up shared by the GPU services: logging, the checkpoint (with `parts`' tensors) and the compute dtype."""
    setup_logging()
    if not args.model:
        raise SystemExit("--model (or MODEL) is required")
    path = resolve_checkpoint(args.model, parts)
    return path, read_model_config(path), torch_dtype(args.dtype, args.device)
