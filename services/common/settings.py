"""Settings: every flag also reads an environment variable, so the same image runs locally and in Kubernetes."""
import argparse
import asyncio
import logging
import os
from typing import Awaitable, Callable

from services.common.checkpoint import CheckpointError


def add(parser: argparse.ArgumentParser, flag: str, env: str, default, help: str, type=str) -> None:
    parser.add_argument(flag, type=type, default=type(os.environ[env]) if env in os.environ else default,
                        help=f"{help} [env {env}, default {default}]")


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run a service; a checkpoint it cannot serve stops it at start-up with the reason, not a traceback."""
    try:
        asyncio.run(main())
    except CheckpointError as e:
        raise SystemExit(f"cannot serve this checkpoint: {e}")
