"""`make run` as a user runs it: the launcher starts the stack, the README's curl examples work, SIGTERM stops all."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from ipaddress import ip_address

import psutil

from services.common import settings
from tests.conftest import noise_image
from tools.run_local import ROOT, free_port


def readme_curls(port: int) -> list[str]:
    blocks = re.findall(r"```sh\n(curl .*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    return [b.replace("localhost:8000", f"127.0.0.1:{port}") for b in blocks]


def readme_python(grpc_port: int) -> str:
    (block,) = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    return block.replace("localhost:50050", f"127.0.0.1:{grpc_port}")


def loopback(ip: str) -> bool:
    address = ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # gRPC's sockets are IPv6, v4 mapped


def test_make_run_serves_the_readme_examples_and_stops_cleanly(tiny_checkpoint, tmp_path):
    port, grpc_port = free_port(), free_port()
    launcher = subprocess.Popen([sys.executable, "-m", "tools.run_local", "--port", str(port), "--grpc-port",
                                 str(grpc_port), "--model", str(tiny_checkpoint)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env={k: v for k, v in os.environ.items() if k != "REDIS_URL"})
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = launcher.stdout.readline()
            assert line, "launcher exited:\n" + "".join(lines)
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        assert f"http://127.0.0.1:{port}" in "".join(lines)
        assert len(psutil.Process(launcher.pid).children()) == 4  # redis, vision encoder, decoder, gateway
        children = psutil.Process(launcher.pid).children(recursive=True)  # the gateway's preprocessing workers too
        # The allocator set up as in the images (services/common/settings.py): every service and worker.
        assert {c.environ().get("GLIBC_TUNABLES") for c in children if "redis" not in c.name()} == \
            {settings.GLIBC_TUNABLES}
        # A stack on localhost is not open to other hosts: no port of any service (the pools take no API key).
        listening = [(c.name(), conn.laddr) for c in children for conn in c.net_connections("inet")
                     if conn.status == psutil.CONN_LISTEN]
        # Redis; the gateway's REST and gRPC; each pool's gRPC and metrics.
        assert len(listening) == 7 and all(loopback(a.ip) for _, a in listening), listening
        for curl in readme_curls(port):
            out = subprocess.run(["bash", "-c", curl.replace("tiny-internvl2_5", tiny_checkpoint.name)],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            if '"stream": true' in curl:
                assert out.stdout.rstrip().endswith("data: [DONE]")
            else:
                assert json.loads(out.stdout)["choices"][0]["finish_reason"] in ("stop", "length")
        # The gRPC example, run as a user would from the repository (it reads image.png from the working folder).
        noise_image(300, 200, seed=4).save(tmp_path / "image.png")
        out = subprocess.run([sys.executable, "-c", readme_python(grpc_port)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(30) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        if launcher.poll() is None:  # a failed check: the services must not outlive the test
            for child in psutil.Process(launcher.pid).children(recursive=True):
                child.kill()
            launcher.kill()


def test_each_test_process_draws_ports_from_a_slice_of_its_own(monkeypatch):
    """Under make test's pytest-xdist workers, worker i of n hands out ports from the i-th n-th of the range only, so
    two workers (and what each starts) never race for one port."""
    from tools import run_local
    monkeypatch.setattr(run_local, "_ephemeral_low", lambda: 30000)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    for worker, (low, high) in {"gw0": (10000, 15000), "gw3": (25000, 30000)}.items():
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        ports = [free_port() for _ in range(50)]
        assert all(low <= p < high for p in ports) and len(set(ports)) == 50, (worker, ports)
