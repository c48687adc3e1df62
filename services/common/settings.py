"""Settings: every flag also reads an environment variable, so the same image runs locally and in Kubernetes."""
import argparse
import logging
import os

import torch


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
