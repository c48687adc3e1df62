"""Settings: every flag also reads an environment variable, so the same image runs locally and in Kubernetes."""
import argparse
import logging
import os


def add(parser: argparse.ArgumentParser, flag: str, env: str, default, help: str, type=str) -> None:
    parser.add_argument(flag, type=type, default=type(os.environ[env]) if env in os.environ else default,
                        help=f"{help} [env {env}, default {default}]")


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
