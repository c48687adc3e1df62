"""Settings: every flag also reads an environment variable, so the same image runs locally and in Kubernetes."""
import argparse
import asyncio
import json
import logging
import os
from typing import Awaitable, Callable

from services.common.checkpoint import CheckpointError


# The services' environment (the images set it; tools/run_local.py too): glibc backs its large blocks (mmap) with
# transparent huge pages where the kernel leaves that to madvise, a page fault per 2 MB instead of per 4 kB. The
# gateway's 7.8 MB of tiles and 27 MB of embeddings per image go through a few such fresh blocks each: measured on a
# 2-CPU VM (bench.gateway, inline embeddings) 155 -> 64 ms of gateway CPU per request; 21 -> 9 ms per 13-tile miss.
GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"


def add(parser: argparse.ArgumentParser, flag: str, env: str, default, help: str, type=str,
        choices: tuple | None = None) -> None:
    parser.add_argument(flag, type=type, default=type(os.environ[env]) if env in os.environ else default,
                        choices=choices, help=f"{help} [env {env}, default {default}]")


class _Formatter(logging.Formatter):
    """`LOG_FORMAT=json`: one JSON object per line; else text. Either way with the record's `fields` (request id,
    status, tokens, ...), as `log_event` attaches them."""

    def __init__(self, as_json: bool):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        if not self.as_json:
            return super().format(record) + "".join(f" {k}={v}" for k, v in fields.items())
        out = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage(), **fields}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter(os.environ.get("LOG_FORMAT", "text") == "json"))
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), handlers=[handler])


def log_event(logger: logging.Logger, message: str, **fields) -> None:
    """One structured line (e.g. a request's access line) carrying `fields`."""
    logger.info(message, extra={"fields": fields})


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run a service; a checkpoint it cannot serve stops it at start-up with the reason, not a traceback."""
    try:
        asyncio.run(main())
    except CheckpointError as e:
        raise SystemExit(f"cannot serve this checkpoint: {e}")
