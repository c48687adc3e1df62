"""The Helm chart (deploy/helm/internvl-serving), rendered by a real Helm engine and checked offline.

The engine is the `helm` binary when one is on the PATH (HELM_ENGINE=binary|sdk forces one), else the Helm v4 Go SDK
that the `helm-python-sdk` wheel embeds. Every rendered object is validated against the Kubernetes JSON schemas that
`kubernetes-validate` ships (CRDs -- KEDA's ScaledObject, the Prometheus operator's ServiceMonitor -- are checked by
hand), then the policies are asserted on the objects: resources, probes, the restricted security profile, GPUs, the
NetworkPolicy flows, autoscaling objects, Redis wiring. Nothing is skipped: without an engine these tests fail.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "internvl-serving"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
RELEASE, NAMESPACE = "ivl", "serving"
KUBE_VERSION = "1.31.0"
FULL = f"{RELEASE}-internvl-serving"
GATEWAY, VISION, DECODER, REDIS = (f"{FULL}-gateway", f"{FULL}-vision-encoder", f"{FULL}-llm-decoder",
                                   f"{FULL}-redis")
COMPONENT = {"gateway": GATEWAY, "vision-encoder": VISION, "llm-decoder": DECODER, "redis": REDIS}
GPU_POOLS = ("vision-encoder", "llm-decoder")
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}


class RenderError(Exception):
    pass


def _merge(base: dict, override: dict) -> dict:
    """Helm's merge of several -f files: maps merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class BinaryHelm:
    """The helm CLI (v3 or v4) on the PATH."""

    def __init__(self, path: str):
        self.path = path
        self.version = subprocess.run([path, "version", "--short"], capture_output=True, text=True,
                                      check=True).stdout.strip()

    def _run(self, args: list[str], files: list[Path]) -> str:
        cmd = [self.path, *args, "--namespace", NAMESPACE] + [a for f in files for a in ("-f", str(f))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode:
            raise RenderError(proc.stderr or proc.stdout)
        return proc.stdout

    def template(self, files: list[Path]) -> str:
        return self._run(["template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION], files)

    def notes(self, files: list[Path]) -> str:
        out = self._run(["install", RELEASE, str(CHART), "--dry-run=client", "--kube-version", KUBE_VERSION], files)
        return out.split("NOTES:", 1)[1]

    def lint(self, files: list[Path]) -> list[str]:
        try:
            self._run(["lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION], files)
        except RenderError as e:
            return [str(e)]
        return []


class SdkHelm:
    """Helm's Go SDK through helm-python-sdk (libhelm_c, no binary)."""

    def __init__(self):
        import helm_python
        self.helm = helm_python
        self.version = f"helm-python-sdk {helm_python.__version__}, Helm SDK {helm_python.helm_sdk_version()}"

    @staticmethod
    def _values(files: list[Path]) -> dict:
        values: dict = {}
        for f in files:
            values = _merge(values, yaml.safe_load(f.read_text()) or {})
        return values

    def _render(self, files: list[Path]) -> dict[str, str]:
        with self.helm.Chart.load(str(CHART)) as chart:
            try:
                return chart.render(self._values(files), name=RELEASE, namespace=NAMESPACE, is_install=True)
            except self.helm.HelmError as e:
                raise RenderError(str(e)) from e

    def template(self, files: list[Path]) -> str:
        return "\n---\n".join(text for name, text in sorted(self._render(files).items())
                              if not name.endswith("NOTES.txt"))

    def notes(self, files: list[Path]) -> str:
        return next(text for name, text in self._render(files).items() if name.endswith("NOTES.txt"))

    def lint(self, files: list[Path]) -> list[str]:
        report = self.helm.lint(str(CHART), self._values(files), strict=True, namespace=NAMESPACE,
                                kube_version=f"v{KUBE_VERSION}")
        # severity: 1 info, 2 warning, 3 error; --strict fails on warnings too.
        return report["errors"] + [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]


@pytest.fixture(scope="session")
def helm():
    """A real Helm engine, or a failure that says how to get one (never a skip)."""
    choice = os.environ.get("HELM_ENGINE", "")
    binary = shutil.which("helm")
    if choice != "sdk" and binary:
        return BinaryHelm(binary)
    if choice == "binary":
        pytest.fail("HELM_ENGINE=binary but no `helm` binary is on the PATH")
    try:
        return SdkHelm()
    except Exception as e:  # ImportError, or the embedded library failing to load
        pytest.fail("no Helm engine: put the `helm` binary on the PATH or install the pinned `helm-python-sdk` "
                    f"wheel (pip install -e '.[test]'): {type(e).__name__}: {e}")


@pytest.fixture(scope="session")
def render(helm, tmp_path_factory):
    """render(*values_files, overrides dict) -> list of objects (cached: the chart is rendered once per input)."""
    cache: dict[str, list[dict]] = {}
    tmp = tmp_path_factory.mktemp("values")

    def _render(*files: Path, **overrides) -> list[dict]:
        key = json.dumps([str(f) for f in files] + [overrides], sort_keys=True)
        if key not in cache:
            paths = list(files)
            if overrides:
                extra = tmp / f"override-{len(cache)}.yaml"
                extra.write_text(yaml.safe_dump(overrides))
                paths.append(extra)
            cache[key] = [o for o in yaml.safe_load_all(helm.template(paths)) if o]
        return cache[key]
    return _render


def values_file(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


CASES = [pytest.param([], id="defaults")] + [pytest.param([f], id=f.stem) for f in EXAMPLES]


# --- The chart as Helm sees it ----------------------------------------------------------------------------------

def test_chart_metadata():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"] == ">=1.29.0-0"
    assert meta["appVersion"]
    assert {f.stem for f in EXAMPLES} == {"internvl2_5-8b", "internvl-chat-v1_5", "external-redis", "keda",
                                          "ingress", "scale-to-zero", "internal-mtls"}


@pytest.mark.parametrize("files", CASES)
def test_lint(helm, files):
    assert helm.lint(files) == []


@pytest.mark.parametrize("files", CASES)
def test_objects_validate_against_kubernetes_schemas(render, files):
    import kubernetes_validate
    objects = render(*files)
    assert objects
    for obj in objects:
        assert obj["metadata"]["namespace"] == NAMESPACE
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/name"] == "internvl-serving"
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue  # checked by hand below
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("bad", [{"gateway": {"replicas": "many"}}, {"replicaCount": 3},
                                 {"llmDecoder": {"gpus": "two"}}, {"visionEncoder": {"replicsa": 1}},
                                 {"redis": {"maxmemoryPolicy": "sometimes"}}, {"networkPolicy": {"enabled": "yes"}},
                                 {"gateway": {"generationConfig": "vllm"}}])
def test_schema_rejects_bad_values(helm, tmp_path, bad):
    with pytest.raises(RenderError, match="(?i)schema|additional propert|want|type|enum|value must be"):
        helm.template([values_file(tmp_path, bad)])


def test_notes_say_how_to_call_the_api(helm):
    notes = helm.notes([])
    assert f"port-forward svc/{GATEWAY} 8000:8000" in notes
    assert "curl http://localhost:8000/v1/chat/completions" in notes
    assert 'base_url="http://localhost:8000/v1"' in notes


# --- Pods ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("files", CASES)
def test_every_pod_is_restricted_and_probed(render, files):
    deployments = find(render(*files), "Deployment")
    assert {component(d) for d in deployments} >= {"gateway", *GPU_POOLS}
    for dep in deployments:
        name, pod = dep["metadata"]["name"], dep["spec"]["template"]["spec"]
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for key in ("runAsUser", "runAsGroup", "fsGroup"):
            assert isinstance(psc[key], int) and psc[key] > 0, (name, key)
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        for volume in pod.get("volumes", []):  # only the volume types the restricted profile allows
            assert set(volume) - {"name"} <= {"emptyDir", "persistentVolumeClaim", "secret", "configMap",
                                               "projected", "downwardAPI", "ephemeral"}, (name, volume)
        writable = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])
                    if not m.get("readOnly")}
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["runAsNonRoot"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert not sc.get("privileged"), name
            assert isinstance(sc["runAsUser"], int) and isinstance(sc["runAsGroup"], int), name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
            assert c["readinessProbe"] and c["livenessProbe"], name
            # Everything the services write goes to a mounted, writable volume.
            env = env_of(c)
            if component(dep) != "redis":
                for var in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
                    path = env[var]["value"]
                    assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in writable), (name, var)
                assert "/tmp" in writable, name


@pytest.mark.parametrize("files", CASES)
def test_gpu_pools(render, files):
    objects = render(*files)
    values = yaml.safe_load(files[0].read_text()) if files else {}
    for dep in find(objects, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        res = c["resources"]
        if component(dep) in GPU_POOLS:
            key = "visionEncoder" if component(dep) == "vision-encoder" else "llmDecoder"
            gpus = values.get(key, {}).get("gpus", 1)
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == gpus
            # With mTLS the kubelet's probes (no client certificate) use the plaintext health-only port.
            probed = "health" if values.get("internalTLS", {}).get("enabled") else "grpc"
            port = next(p["containerPort"] for p in c["ports"] if p["name"] == probed)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["grpc"] == {"port": port}, probe
            budget = values.get(key, {}).get("probes", {}).get("startupBudgetSeconds", 1800)
            startup = c["startupProbe"]
            assert startup["failureThreshold"] * startup["periodSeconds"] == budget
            assert env_of(c)["DEVICE"]["value"] == "cuda"
            if key == "llmDecoder":  # decode steps overlapped with the host's work unless the values say not
                overlap = values.get(key, {}).get("overlapSteps", True)
                assert env_of(c)["OVERLAP_STEPS"]["value"] == ("1" if overlap else "0")
                recent = values.get(key, {}).get("recentImagesMB", 1024)
                assert env_of(c)["DECODER_RECENT_IMAGES_MB"]["value"] == str(recent)
        else:
            assert not any("gpu" in k for kind in ("requests", "limits") for k in res[kind]), dep["metadata"]["name"]
        if component(dep) in GPU_POOLS + ("gateway",):
            # A memory-backed /dev/shm (a container's own is 64 MB): the pools' torch, the gateway's preprocessing
            # workers' tiles.
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
            assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        if component(dep) == "gateway":
            for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
                assert c[probe]["httpGet"] == {"path": path, "port": "http"}, probe


def test_internal_mtls(render, helm, tmp_path):
    """internalTLS: the Secret mounted read-only in the gateway and both pools, the pools' TLS and client-CA settings,
    the gateway's CA, client certificate and server name, probes on the health port; off by default."""
    tls_dir = "/etc/internvl-serving/tls"
    volume = {"name": "internal-tls", "secret": {"secretName": "internvl-internal-tls", "defaultMode": 0o440}}
    mount = {"name": "internal-tls", "mountPath": tls_dir, "readOnly": True}
    objects = render(CHART / "examples" / "internal-mtls.yaml", internalTLS={"healthPort": 50070})
    for name in (VISION, DECODER):
        pod = one(objects, "Deployment", name)["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        env = env_of(c)
        assert {k: env[k]["value"] for k in env if k.startswith("GRPC_")} == {
            "GRPC_TLS_CERT": f"{tls_dir}/tls.crt", "GRPC_TLS_KEY": f"{tls_dir}/tls.key",
            "GRPC_TLS_CLIENT_CA": f"{tls_dir}/ca.crt", "GRPC_HEALTH_PORT": "50070"}
        assert {"name": "health", "containerPort": 50070, "protocol": "TCP"} in c["ports"]
        assert all(c[probe]["grpc"] == {"port": 50070} for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
        assert volume in pod["volumes"] and mount in c["volumeMounts"]
        grpc_port = next(p for p in one(objects, "Service", name)["spec"]["ports"] if p["name"] == "grpc")
        assert "appProtocol" not in grpc_port  # not h2c (cleartext) any more
    pod = one(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    assert {k: env[k]["value"] for k in env if k.startswith("POOL_TLS_")} == {
        "POOL_TLS_CA": f"{tls_dir}/ca.crt", "POOL_TLS_CERT": f"{tls_dir}/tls.crt", "POOL_TLS_KEY": f"{tls_dir}/tls.key",
        "POOL_TLS_SERVER_NAME": "internvl-pools"}
    assert volume in pod["volumes"] and mount in pod["containers"][0]["volumeMounts"]

    for dep in find(render(), "Deployment"):  # off by default
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert not [k for k in env_of(c) if "TLS" in k or k == "GRPC_HEALTH_PORT"], dep["metadata"]["name"]
        assert not any(v["name"] == "internal-tls" for v in dep["spec"]["template"]["spec"]["volumes"])
    with pytest.raises(RenderError, match="(?i)secretName|schema|length"):  # on without a Secret
        helm.template([values_file(tmp_path, {"internalTLS": {"enabled": True}})])


def test_gpu_resource_name_and_count_are_values(render):
    objects = render(gpuResourceName="nvidia.com/mig-3g.40gb", visionEncoder={"gpus": 2})
    vision = one(objects, "Deployment", VISION)["spec"]["template"]["spec"]["containers"][0]["resources"]
    decoder = one(objects, "Deployment", DECODER)["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert vision["limits"]["nvidia.com/mig-3g.40gb"] == 2 and "nvidia.com/gpu" not in vision["limits"]
    assert decoder["requests"]["nvidia.com/mig-3g.40gb"] == 1


def test_startup_budget_is_a_value(render):
    objects = render(llmDecoder={"probes": {"startupBudgetSeconds": 3600, "periodSeconds": 20}})
    startup = one(objects, "Deployment", DECODER)["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert (startup["failureThreshold"], startup["periodSeconds"]) == (180, 20)


def test_scheduling_values_reach_the_pods(render):
    tsc = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule"}
    objects = render(llmDecoder={"nodeSelector": {"gpu": "h100"}, "priorityClassName": "gpu-high",
                                 "topologySpreadConstraints": [tsc],
                                 "extraEnv": [{"name": "LOG_LEVEL", "value": "DEBUG"}]})
    pod = one(objects, "Deployment", DECODER)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "gpu-high"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "llm-decoder"
    assert env_of(pod["containers"][0])["LOG_LEVEL"]["value"] == "DEBUG"


# --- Model source ---------------------------------------------------------------------------------------------------

def test_model_from_the_hub_with_token_and_shared_cache(render):
    objects = render(model={"id": "OpenGVLab/InternVL2_5-4B", "hfToken": {"existingSecret": "hf"},
                            "hubCache": {"existingClaim": "hub-cache"}})
    for name in (GATEWAY, VISION, DECODER):
        pod = one(objects, "Deployment", name)["spec"]["template"]["spec"]
        env = env_of(pod["containers"][0])
        assert env["MODEL"]["value"] == "OpenGVLab/InternVL2_5-4B"
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}
        hf = next(v for v in pod["volumes"] if v["name"] == "hf-home")
        assert hf["persistentVolumeClaim"]["claimName"] == "hub-cache"
        assert "HF_HUB_OFFLINE" not in env


def test_model_from_a_pvc_is_mounted_read_only(render):
    objects = render(model={"existingClaim": "weights", "subPath": "InternVL2_5-8B", "mountPath": "/models/ivl"})
    for name in (GATEWAY, VISION, DECODER):
        pod = one(objects, "Deployment", name)["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert env_of(c)["MODEL"]["value"] == "/models/ivl"
        assert env_of(c)["HF_HUB_OFFLINE"]["value"] == "1"
        mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
        assert mount == {"name": "model", "mountPath": "/models/ivl", "subPath": "InternVL2_5-8B", "readOnly": True}
        volume = next(v for v in pod["volumes"] if v["name"] == "model")
        assert volume["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
        hf = next(v for v in pod["volumes"] if v["name"] == "hf-home")
        assert "emptyDir" in hf


# --- Services, gateway wiring, RBAC -------------------------------------------------------------------------------

@pytest.mark.parametrize("files", CASES)
def test_services_select_their_pods(render, files):
    objects = render(*files)
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in find(objects, "Deployment")]
    for svc in find(objects, "Service"):
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), svc["metadata"]["name"]
    for name in (VISION, DECODER):
        svc = one(objects, "Service", name)
        assert svc["spec"]["clusterIP"] == "None"
        assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "metrics"}
    gateway = one(objects, "Service", GATEWAY)
    assert gateway["spec"].get("clusterIP") != "None"
    assert {(p["name"], p["port"]) for p in gateway["spec"]["ports"]} >= {("http", 8000), ("grpc", 50050)}
    for dep in find(objects, "Deployment"):
        (pdb,) = [p for p in find(objects, "PodDisruptionBudget") if component(p) == component(dep)]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_gateway_finds_the_pools(render):
    objects = render()
    pod = one(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    assert env["VISION_SERVICE"]["value"] == VISION and env["DECODER_SERVICE"]["value"] == DECODER
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["VISION_ADDR"]["value"] == f"{VISION}.{NAMESPACE}.svc.cluster.local:50051"
    assert env["DECODER_ADDR"]["value"] == f"{DECODER}.{NAMESPACE}.svc.cluster.local:50052"
    assert env["POOL_WAIT_S"]["value"] == "1800" and env["WAIT_FOR_POOLS"]["value"] == "1"
    # Pools that scale to zero come up on demand: the gateway serves before them.
    zero = one(render(CHART / "examples" / "scale-to-zero.yaml"), "Deployment", GATEWAY)
    assert env_of(zero["spec"]["template"]["spec"]["containers"][0])["WAIT_FOR_POOLS"]["value"] == "0"
    sa = pod["serviceAccountName"]
    assert one(objects, "ServiceAccount", sa)
    role = one(objects, "Role", GATEWAY)
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    binding = one(objects, "RoleBinding", GATEWAY)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": GATEWAY}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    for name in (VISION, DECODER, REDIS):  # only the gateway talks to the API server
        assert one(objects, "Deployment", name)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_ingress_routes_to_the_gateway(render):
    objects = render(CHART / "examples" / "ingress.yaml")
    ingress = one(objects, "Ingress", GATEWAY)
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": GATEWAY, "port": {"name": "http"}}
    assert not find(render(), "Ingress")


# --- Redis ---------------------------------------------------------------------------------------------------------

def test_in_chart_redis(render):
    objects = render()
    dep = one(objects, "Deployment", REDIS)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "redis:7"
    args = c["args"]
    assert args[args.index("--maxmemory") + 1] == "2gb"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    secret = one(objects, "Secret", REDIS)
    assert secret["data"]["redis-password"]
    assert one(objects, "Service", REDIS)["spec"]["ports"][0]["port"] == 6379
    for name in (GATEWAY, VISION, DECODER):  # the decoder reads embeddings the gateway names by key
        names = [e["name"] for e in one(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]["env"]]
        env = env_of(one(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0])
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": REDIS, "key": "redis-password"}
        assert env["REDIS_URL"]["value"] == f"redis://:$(REDIS_PASSWORD)@{REDIS}:6379/0"
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")  # $(VAR) expands only earlier variables


def test_redis_password_from_an_existing_secret(render):
    objects = render(redis={"auth": {"existingSecret": "my-redis", "existingSecretKey": "pw"}})
    assert not find(objects, "Secret")
    env = env_of(one(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]["containers"][0])
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "pw"}


def test_external_redis(render):
    for objects, expected in [
        (render(CHART / "examples" / "external-redis.yaml"),
         {"valueFrom": {"secretKeyRef": {"name": "internvl-redis", "key": "redis-url"}}}),
        (render(redis={"enabled": False, "external": {"url": "redis://cache.example:6379/2"}}),
         {"value": "redis://cache.example:6379/2"}),
    ]:
        assert not [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"]
        assert not find(objects, "Secret")
        for name in (GATEWAY, VISION, DECODER):
            env = env_of(one(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0])
            assert {k: v for k, v in env["REDIS_URL"].items() if k != "name"} == expected
            assert "REDIS_PASSWORD" not in env


# --- NetworkPolicies -----------------------------------------------------------------------------------------------

def _peer(peer: dict | None) -> str:
    """A NetworkPolicy peer as a short name: a component of this release, a namespace, a CIDR, or any."""
    if peer is None:
        return "any"
    if "ipBlock" in peer:
        return "cidr:" + peer["ipBlock"]["cidr"]
    ns = (peer.get("namespaceSelector") or {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
    labels = (peer.get("podSelector") or {}).get("matchLabels", {})
    if "namespaceSelector" not in peer and labels.get("app.kubernetes.io/instance") == RELEASE:
        return labels["app.kubernetes.io/component"]
    if ns:
        return f"ns:{ns}" + (f"/{labels}" if labels else "")
    return "any"


def flows(objects: list[dict]) -> tuple[set, set]:
    """(ingress, egress) allowed by the release's NetworkPolicies, as (from, to, port/protocol) triples."""
    ingress, egress = set(), set()
    for pol in find(objects, "NetworkPolicy"):
        spec = pol["spec"]
        labels = spec["podSelector"]["matchLabels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        target = labels.get("app.kubernetes.io/component", "all")
        for rule in spec.get("ingress", []):
            for peer in rule.get("from") or [None]:
                for p in rule["ports"]:
                    ingress.add((_peer(peer), target, f"{p['port']}/{p['protocol']}"))
        for rule in spec.get("egress", []):
            for peer in rule.get("to") or [None]:
                for p in rule["ports"]:
                    egress.add((target, _peer(peer), f"{p['port']}/{p['protocol']}"))
    return ingress, egress


MONITORING = "ns:monitoring"
BASE_INGRESS = {
    ("any", "gateway", "8000/TCP"), ("any", "gateway", "50050/TCP"),
    ("gateway", "vision-encoder", "50051/TCP"), ("gateway", "llm-decoder", "50052/TCP"),
    ("gateway", "redis", "6379/TCP"), ("vision-encoder", "redis", "6379/TCP"), ("llm-decoder", "redis", "6379/TCP"),
    (MONITORING, "gateway", "8000/TCP"), (MONITORING, "vision-encoder", "9101/TCP"),
    (MONITORING, "llm-decoder", "9102/TCP"),
}
BASE_EGRESS = {
    ("all", "any", "53/UDP"), ("all", "any", "53/TCP"),
    ("gateway", "vision-encoder", "50051/TCP"), ("gateway", "llm-decoder", "50052/TCP"),
    ("gateway", "redis", "6379/TCP"), ("vision-encoder", "redis", "6379/TCP"), ("llm-decoder", "redis", "6379/TCP"),
    ("gateway", "cidr:0.0.0.0/0", "443/TCP"), ("gateway", "cidr:0.0.0.0/0", "6443/TCP"),  # Kubernetes API
    ("gateway", "cidr:0.0.0.0/0", "80/TCP"),  # image URLs (and 443, with private ranges excepted)
}
HUB = {(c, "cidr:0.0.0.0/0", "443/TCP") for c in ("gateway", *GPU_POOLS)}


def test_default_deny_covers_every_pod(render):
    objects = render()
    deny = one(objects, "NetworkPolicy", f"{FULL}-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    for dep in find(objects, "Deployment"):
        assert deny["spec"]["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    for pol in find(objects, "NetworkPolicy"):
        assert "Egress" in pol["spec"]["policyTypes"]


def test_network_flows_hub_model(render):
    ingress, egress = flows(render())
    assert ingress == BASE_INGRESS
    assert egress == BASE_EGRESS | HUB
    gw = one(render(), "NetworkPolicy", GATEWAY)
    image_rule = next(r for r in gw["spec"]["egress"] if {p["port"] for p in r["ports"]} == {80, 443})
    assert "169.254.0.0/16" in image_rule["to"][0]["ipBlock"]["except"]  # no cloud metadata through image URLs


def test_network_flows_pvc_model_has_no_hub_egress(render):
    ingress, egress = flows(render(CHART / "examples" / "internvl-chat-v1_5.yaml"))
    assert ingress == BASE_INGRESS
    assert egress == BASE_EGRESS
    assert not {f for f in egress if f[0] in GPU_POOLS and f[1].startswith("cidr:")}


def test_network_flows_restricted_clients_no_internet(render):
    objects = render(CHART / "examples" / "ingress.yaml",
                     networkPolicy={"imageFetch": {"enabled": False}, "hubEgress": {"enabled": False},
                                    "kubeApi": {"cidrs": ["172.20.0.1/32"], "ports": [443]}})
    ingress, egress = flows(objects)
    nginx = "ns:ingress-nginx"
    assert ingress == (BASE_INGRESS - {("any", "gateway", "8000/TCP"), ("any", "gateway", "50050/TCP")}
                       | {(nginx, "gateway", "8000/TCP"), (nginx, "gateway", "50050/TCP")})
    assert egress == (BASE_EGRESS - {f for f in BASE_EGRESS if f[1] == "cidr:0.0.0.0/0"}
                      | {("gateway", "cidr:172.20.0.1/32", "443/TCP")})


def test_network_flows_external_redis(render):
    ingress, egress = flows(render(CHART / "examples" / "external-redis.yaml"))
    to_redis = {f for f in BASE_EGRESS if f[1] == "redis"}
    assert ingress == {f for f in BASE_INGRESS if f[1] != "redis"}
    assert egress == (BASE_EGRESS - to_redis | HUB
                      | {(c, "cidr:10.20.0.0/16", "6380/TCP") for c in ("gateway", "vision-encoder", "llm-decoder")})


def test_network_flows_separate_gateway_metrics_port(render):
    ingress, _ = flows(render(gateway={"metrics": {"port": 9100}}, networkPolicy={"monitoring": {"enabled": False}}))
    assert ingress == {f for f in BASE_INGRESS if f[0] != MONITORING}
    ingress, _ = flows(render(gateway={"metrics": {"port": 9100}}))
    assert ingress == BASE_INGRESS - {(MONITORING, "gateway", "8000/TCP")} | {(MONITORING, "gateway", "9100/TCP")}


def test_network_policy_can_be_turned_off(render):
    assert not find(render(networkPolicy={"enabled": False}), "NetworkPolicy")


# --- Autoscaling and monitoring ---------------------------------------------------------------------------------

def test_no_autoscaling_or_crds_by_default(render):
    objects = render()
    assert not find(objects, "ScaledObject") and not find(objects, "HorizontalPodAutoscaler")
    assert not find(objects, "ServiceMonitor")
    assert {one(objects, "Deployment", n)["spec"]["replicas"] for n in (VISION, DECODER)} == {1}


def _check_scaled_object(objects: list[dict], name: str) -> dict:
    so = one(objects, "ScaledObject", name)
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert "replicas" not in one(objects, "Deployment", name)["spec"]  # KEDA's HPA owns it
    assert isinstance(spec["minReplicaCount"], int) and isinstance(spec["maxReplicaCount"], int)
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert isinstance(spec["pollingInterval"], int) and isinstance(spec["cooldownPeriod"], int)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 600  # sized for model load
    assert spec["triggers"]
    for t in spec["triggers"]:
        assert t["type"] == "prometheus" and t["name"] and t["metricType"] in ("AverageValue", "Value")
        md = t["metadata"]
        assert all(isinstance(v, str) for v in md.values())  # KEDA wants strings
        assert md["serverAddress"].startswith("http") and md["query"] and float(md["threshold"]) > 0
        assert "{{" not in md["query"] and f'namespace="{NAMESPACE}"' in md["query"]
    return so


def test_keda_example(render):
    objects = render(CHART / "examples" / "keda.yaml")
    vision = _check_scaled_object(objects, VISION)
    queries = " ".join(t["metadata"]["query"] for t in vision["spec"]["triggers"])
    assert "vision_queued_tiles" in queries and "vision_tiles_encoded_total" in queries
    assert f'service="{VISION}"' in queries
    decoder = _check_scaled_object(objects, DECODER)
    queries = " ".join(t["metadata"]["query"] for t in decoder["spec"]["triggers"])
    assert "vllm:num_requests_waiting" in queries and "vllm:kv_cache_usage_perc" in queries
    assert decoder["spec"]["minReplicaCount"] == 2 and decoder["spec"]["maxReplicaCount"] == 8
    assert {t["metadata"]["threshold"] for t in decoder["spec"]["triggers"]} == {"4", "0.75"}
    hpa = one(objects, "HorizontalPodAutoscaler", GATEWAY)
    assert hpa["spec"]["scaleTargetRef"]["name"] == GATEWAY
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in one(objects, "Deployment", GATEWAY)["spec"]
    # The ServiceMonitors scrape each metrics port through a Service that has it.
    services = {s["metadata"]["name"]: s for s in find(objects, "Service")}
    monitors = find(objects, "ServiceMonitor")
    assert len(monitors) == 3
    for sm in monitors:
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        svc = services[sm["metadata"]["name"]]
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        ports = {p["name"] for p in svc["spec"]["ports"]}
        assert sm["spec"]["endpoints"] and all(e["port"] in ports for e in sm["spec"]["endpoints"])


def test_scale_to_zero_example(render):
    objects = render(CHART / "examples" / "scale-to-zero.yaml")
    for name in (VISION, DECODER):
        so = _check_scaled_object(objects, name)
        assert so["spec"]["minReplicaCount"] == 0
        demand = next(t for t in so["spec"]["triggers"] if t["name"] == "gateway-demand")
        assert "gateway_requests_in_flight" in demand["metadata"]["query"]
        assert "gateway_requests_total" in demand["metadata"]["query"]
        assert demand["metadata"]["activationThreshold"] == "0"


def test_keda_queries_and_thresholds_are_values(render):
    objects = render(visionEncoder={"autoscaling": {
        "enabled": True, "minReplicas": 2, "maxReplicas": 3, "cooldownPeriod": 1200,
        "triggers": [{"name": "custom", "query": 'sum(my_metric{ns="{{ .Release.Namespace }}"})', "threshold": 7}]}})
    so = one(objects, "ScaledObject", VISION)
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"], so["spec"]["cooldownPeriod"]) == (2, 3, 1200)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["metadata"]["query"] == f'sum(my_metric{{ns="{NAMESPACE}"}})'
    assert trigger["metadata"]["threshold"] == "7"
    assert not find(objects, "ScaledObject", DECODER)


def test_every_pod_shuts_down_within_its_grace_period(render):
    for name in (GATEWAY, VISION, DECODER):
        pod = one(render(), "Deployment", name)["spec"]["template"]["spec"]
        env = env_of(pod["containers"][0])
        budget = float(env["SHUTDOWN_DELAY_S"]["value"]) + float(env["SHUTDOWN_GRACE_S"]["value"])
        assert 0 < budget < pod["terminationGracePeriodSeconds"], name
