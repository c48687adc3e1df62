"""Client-side load balancing over the pods of a pool.

A Kubernetes Service balances connections, not calls: the gateway's one long-lived HTTP/2 connection to a pool's
ClusterIP would pin every call to one pod. A `Balancer` keeps a channel per ready endpoint and sends each call to the
endpoint with the fewest calls outstanding. Its endpoints come from a source task: the Service's EndpointSlices
(`watch_endpoint_slices`), or addresses and DNS names re-resolved periodically (`watch_addresses`).
"""
import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterable

import grpc

from services.common.grpc_utils import create_channel

log = logging.getLogger(__name__)

Update = Callable[[Iterable[str]], None]  # a source hands the balancer the full set of ready addresses
Resolve = Callable[[str, int], Awaitable[list[str]]]

# An endpoint back from an ejection must be reachable when the ejection ends, not after gRPC's reconnect backoff
# (up to 120 s by default): its channel retries the connection at least every second.
CHANNEL_OPTIONS = [("grpc.max_reconnect_backoff_ms", 1000), ("grpc.initial_reconnect_backoff_ms", 200)]


def unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@dataclass(eq=False)
class Endpoint:
    addr: str
    channel: grpc.aio.Channel
    stub: object
    outstanding: int = 0        # calls started and not yet ended
    calls: int = 0              # calls started here in all (tries included)
    draining: bool = False      # left the pool: no new calls; the channel closes after the last one
    ejected_until: float = 0.0  # time.monotonic() before which it gets no calls (it was unreachable)
    ejections: int = 0          # in a row, without a call that reached it since; each doubles the period


class Balancer:
    """One pool's endpoints; least outstanding calls first, round-robin among equals."""

    def __init__(self, name: str, stub_class, eject_s: float = 10.0, max_eject_s: float = 300.0,
                 wait_s: float = 0.0):
        self.name, self.stub_class, self.eject_s, self.max_eject_s = name, stub_class, eject_s, max_eject_s
        self.wait_s = wait_s  # how long a call waits for a first endpoint (a pool scaled to zero) before failing
        self._has_endpoints = asyncio.Event()
        self.endpoints: dict[str, Endpoint] = {}  # ready: new calls go to these
        self.draining: set[Endpoint] = set()      # removed, with calls still in flight
        self._turn = 0
        self._source: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()

    def start(self, source: Callable[[Update], Awaitable[None]]) -> "Balancer":
        """Run an endpoint source (e.g. `lambda update: watch_addresses("a:1,b:2", update)`) until `close`."""
        self._source = asyncio.create_task(source(self.set_endpoints))
        self._source.add_done_callback(self._source_ended)
        return self

    def _source_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception():  # else it would only show when the task is collected
            log.error("%s pool: the endpoint source failed", self.name, exc_info=task.exception())

    async def close(self) -> None:
        if self._source:
            self._source.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._source
        for ep in [*self.endpoints.values(), *self.draining]:
            await ep.channel.close()
        self.endpoints.clear()
        self.draining.clear()
        await asyncio.gather(*self._closing)

    def set_endpoints(self, addrs: Iterable[str]) -> None:
        """The pool is now exactly these addresses: new ones get a channel, the others drain."""
        addrs = set(addrs)
        added, removed = addrs - self.endpoints.keys(), self.endpoints.keys() - addrs
        for addr in added:
            channel = create_channel(addr, CHANNEL_OPTIONS)
            self.endpoints[addr] = Endpoint(addr, channel, self.stub_class(channel))
        for addr in removed:
            ep = self.endpoints.pop(addr)
            ep.draining = True
            self.draining.add(ep)
            self._close_if_idle(ep)
        if self.endpoints:
            self._has_endpoints.set()
        else:
            self._has_endpoints.clear()
        if added or removed:
            log.info("%s pool: %s (added %s, removed %s)", self.name, sorted(self.endpoints) or "no endpoints",
                     sorted(added), sorted(removed))

    def load(self) -> dict[str, int]:
        """Outstanding calls per ready endpoint."""
        return {addr: ep.outstanding for addr, ep in self.endpoints.items()}

    def ejected(self) -> dict[str, float]:
        """Seconds of ejection left per ejected endpoint."""
        now = time.monotonic()
        return {addr: ep.ejected_until - now for addr, ep in self.endpoints.items() if ep.ejected_until > now}

    async def unary(self, method: str, request, timeout: float | None = None, **kwargs):
        """`method` on the least-loaded endpoint; once more on another if the first was unreachable."""
        deadline = None if timeout is None else time.monotonic() + timeout
        await self._endpoints_up()
        tried: list[Endpoint] = []
        while True:
            ep, code = self._acquire(tried), None
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                response = await getattr(ep.stub, method)(request, timeout=left, **kwargs)
                code = grpc.StatusCode.OK
                return response
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if not self._retry(ep, code, tried):
                    raise
            finally:
                self._release(ep, code)

    async def stream(self, method: str, request, **kwargs) -> AsyncIterator:
        """The responses of a server-streaming `method`; outstanding until the stream ends or the caller closes
        (or cancels) it. Retried once on another endpoint if the first was unreachable before any response."""
        await self._endpoints_up()
        tried: list[Endpoint] = []
        while True:
            ep, code, started = self._acquire(tried), None, False
            call = getattr(ep.stub, method)(request, **kwargs)
            try:
                async for response in call:
                    started = True
                    yield response
                code = grpc.StatusCode.OK
                return
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if started or not self._retry(ep, code, tried):
                    raise
            finally:
                call.cancel()  # a caller that went away: the server stops the work
                self._release(ep, code or (grpc.StatusCode.OK if started else None))

    async def each(self, method: str, request, **kwargs) -> dict[str, object]:
        """`method` on every ready endpoint (the start-up check that all of them serve the same model)."""
        eps = list(self.endpoints.values())
        if not eps:
            raise unavailable(f"no ready endpoint in the {self.name} pool")
        results = await asyncio.gather(*(getattr(ep.stub, method)(request, **kwargs) for ep in eps))
        return {ep.addr: r for ep, r in zip(eps, results)}

    async def _endpoints_up(self) -> None:
        if not self.endpoints and self.wait_s > 0:
            with contextlib.suppress(TimeoutError):  # still none: _acquire says so
                await asyncio.wait_for(self._has_endpoints.wait(), self.wait_s)

    def _acquire(self, tried: list[Endpoint]) -> Endpoint:
        candidates = [ep for ep in self.endpoints.values() if ep not in tried]
        if not candidates:
            raise unavailable(f"no ready endpoint in the {self.name} pool")
        now = time.monotonic()
        # With every endpoint ejected, try them anyway: better than refusing all calls for the ejection period.
        candidates = [ep for ep in candidates if ep.ejected_until <= now] or candidates
        least = min(ep.outstanding for ep in candidates)
        ties = [ep for ep in candidates if ep.outstanding == least]
        self._turn += 1
        ep = ties[self._turn % len(ties)]
        ep.outstanding += 1
        ep.calls += 1
        return ep

    def _retry(self, ep: Endpoint, code: grpc.StatusCode, tried: list[Endpoint]) -> bool:
        """Whether a failed call may go to another endpoint: only when this one was unreachable (the request did
        not run there), only once, and only if there is another."""
        tried.append(ep)
        return (code == grpc.StatusCode.UNAVAILABLE and len(tried) == 1
                and any(other not in tried for other in self.endpoints.values()))

    def _release(self, ep: Endpoint, code: grpc.StatusCode | None) -> None:
        ep.outstanding -= 1
        if code == grpc.StatusCode.UNAVAILABLE:
            self._eject(ep)
        elif code not in (None, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            ep.ejections = 0  # it answered
        self._close_if_idle(ep)

    def _eject(self, ep: Endpoint) -> None:
        now = time.monotonic()
        if ep.ejected_until > now or ep.draining:
            return  # the calls in flight when it went away fail together: one ejection
        period = min(self.eject_s * 2 ** ep.ejections, self.max_eject_s)
        ep.ejections += 1
        ep.ejected_until = now + period
        log.warning("%s pool: %s unreachable, no calls for %.1fs", self.name, ep.addr, period)

    def _close_if_idle(self, ep: Endpoint) -> None:
        if ep.draining and ep.outstanding == 0 and ep in self.draining:
            self.draining.discard(ep)
            task = asyncio.get_running_loop().create_task(ep.channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


# ---------------------------------------------------------------- sources without API access

def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def parse_addresses(spec: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The `host:port` entries and the `dns:///name:port` names of a comma-separated list."""
    static, names = [], []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        if entry.startswith("dns:"):
            host, _, port = entry.removeprefix("dns:").lstrip("/").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{entry!r} is not dns:///name:port")
            names.append((host.strip("[]"), int(port)))
        else:
            static.append(entry)
    if not static and not names:
        raise ValueError(f"no address in {spec!r}")
    return static, names


async def watch_addresses(spec: str, update: Update, interval_s: float = 5.0, resolve: Resolve = resolve_host) -> None:
    """Endpoints from a comma-separated list: `host:port` entries as they are (gRPC resolves a name once per
    connection), `dns:///name:port` entries re-resolved every `interval_s`, each address an endpoint (a headless
    Service's pods)."""
    static, names = parse_addresses(spec)
    last: dict[tuple[str, int], set[str]] = {name: set() for name in names}
    while True:
        for host, port in names:
            try:
                last[host, port] = {join_host_port(ip, port) for ip in await resolve(host, port)}
            except socket.gaierror as e:
                if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
                    last[host, port] = set()  # the name has no addresses (no ready pods)
                else:  # a resolver hiccup is no reason to drop the pool: keep what it had
                    log.warning("resolving %s failed (%s); keeping %s", host, e, sorted(last[host, port]))
        update(set(static).union(*last.values()))
        if not names:
            return
        await asyncio.sleep(interval_s)


# ---------------------------------------------------------------- Kubernetes EndpointSlices

def pod_namespace() -> str:
    """POD_NAMESPACE, else the service account's namespace (in a pod), else the kubeconfig context's."""
    if ns := os.environ.get("POD_NAMESPACE"):
        return ns
    with contextlib.suppress(OSError):
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    with contextlib.suppress(Exception):
        from kubernetes.aio import config
        return config.list_kube_config_contexts()[1]["context"].get("namespace") or "default"
    return "default"


async def kube_api_client():
    """The pod's service account in a cluster, else KUBECONFIG (or ~/.kube/config)."""
    from kubernetes.aio import client, config
    cfg = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=cfg)
    else:
        await config.load_kube_config(client_configuration=cfg)
    return client.ApiClient(cfg)


def ready_addresses(endpoint_slice, port_name: str = "grpc") -> set[str]:
    """host:port of a slice's ready endpoints; the port named `port_name`, or the slice's only port."""
    ports = endpoint_slice.ports or []
    port = next((p.port for p in ports if p.name == port_name), None)
    if port is None and len(ports) == 1:
        port = ports[0].port
    if port is None:
        log.warning("EndpointSlice %s has no port named %r", endpoint_slice.metadata.name, port_name)
        return set()
    # Only ready endpoints get new calls: serving-but-terminating ones finish what they have. The API says an
    # unset `ready` means ready. An endpoint's addresses are interchangeable: the first one is used.
    return {join_host_port(ep.addresses[0], port) for ep in endpoint_slice.endpoints or []
            if ep.addresses and (ep.conditions is None or ep.conditions.ready is not False)}


async def watch_endpoint_slices(api_client, namespace: str, service: str, update: Update, port_name: str = "grpc",
                                backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> None:
    """Ready endpoints of a Service from its EndpointSlices: list, then watch from the list's resourceVersion;
    list again when that version is gone (410), back off on errors (the pool keeps its endpoints meanwhile)."""
    from kubernetes.aio import client, watch
    api = client.DiscoveryV1Api(api_client)
    selector = f"kubernetes.io/service-name={service}"
    backoff = backoff_s
    while True:
        try:
            listed = await api.list_namespaced_endpoint_slice(namespace, label_selector=selector)
            slices = {s.metadata.name: ready_addresses(s, port_name) for s in listed.items}
            update(set().union(*slices.values()))
            backoff = backoff_s
            async with watch.Watch() as w:
                async for event in w.stream(api.list_namespaced_endpoint_slice, namespace, label_selector=selector,
                                            resource_version=listed.metadata.resource_version,
                                            allow_watch_bookmarks=True):
                    name = event["object"].metadata.name
                    if event["type"] == "DELETED":
                        slices.pop(name, None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        slices[name] = ready_addresses(event["object"], port_name)
                    else:
                        continue  # BOOKMARK: only moves the resourceVersion on
                    update(set().union(*slices.values()))
        except client.ApiException as e:
            if e.status == 410:  # our resourceVersion was compacted away: what we missed is only in a new list
                log.info("EndpointSlices of %s: watch expired, listing again", service)
                continue
            log.warning("EndpointSlices of %s: %s %s; retrying in %.1fs", service, e.status, e.reason, backoff)
        except Exception as e:
            log.warning("EndpointSlices of %s: %r; retrying in %.1fs", service, e, backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff_s)
