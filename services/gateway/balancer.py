"""Client-side load balancing over the pods of a pool.

A Kubernetes Service balances connections, not calls: the gateway's one long-lived HTTP/2 connection to a pool's
ClusterIP would pin every call to one pod. A `Balancer` keeps a channel per ready endpoint and sends each call to the
endpoint with the fewest calls outstanding. Its endpoints come from a source task: the Service's EndpointSlices
(`watch_endpoint_slices`), or addresses and DNS names re-resolved periodically (`watch_addresses`).

With a `check`, an endpoint gets calls only once its facts (`Info`: checkpoint, weights fingerprint, ...) pass it.
They are read again after each reconnection (a rolling update may put another process, other weights, behind an
address) and when the caller saw a sign of change (`recheck`).
"""
import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Iterable

import grpc

from internvl.serving.v1 import serving_pb2 as pb
from services.common.grpc_utils import create_channel
from services.gateway.metrics import POOL_ENDPOINTS, POOL_MISMATCHES

log = logging.getLogger(__name__)

Update = Callable[[Iterable[str]], None]  # a source hands the balancer the full set of ready addresses
Resolve = Callable[[str, int], Awaitable[list[str]]]
Check = Callable[[pb.ModelInfo], str | None]  # why an endpoint serving this gets no calls; None: it may get them

# Calls an endpoint may have beyond the least loaded one and still take the calls whose affinity key ranks it first.
AFFINITY_SLACK = 4

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
    info: pb.ModelInfo | None = None  # its facts as last read (pools with a `check`)
    refused: str | None = None  # why `check` keeps it out of rotation
    read_at: int = 0            # order of the last reading of its facts (the newest wins ties)
    watcher: asyncio.Task | None = None
    recheck: asyncio.Event = field(default_factory=asyncio.Event)


def _rank(key: str, addr: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{addr}".encode(), digest_size=8).digest(), "big")


class Balancer:
    """One pool's endpoints; least outstanding calls first, round-robin among equals. A call with an affinity key
    goes to the endpoint the key ranks first (rendezvous hashing: endpoints that join or leave move only their share
    of keys) unless that one has more than AFFINITY_SLACK calls beyond the least loaded: calls about one image meet
    the KV blocks and the image's rows where they are."""

    def __init__(self, name: str, stub_class, eject_s: float = 10.0, max_eject_s: float = 300.0,
                 wait_s: float = 0.0, check: Check | None = None, info_timeout_s: float = 5.0,
                 credentials: grpc.ChannelCredentials | None = None, server_name: str | None = None):
        self.name, self.stub_class, self.eject_s, self.max_eject_s = name, stub_class, eject_s, max_eject_s
        self.credentials, self.server_name = credentials, server_name  # TLS to the endpoints (None: plaintext)
        self.wait_s = wait_s  # how long a call waits for a first endpoint (a pool scaled to zero) before failing
        self.check, self.info_timeout_s = check, info_timeout_s
        if check:
            POOL_MISMATCHES.labels(name)  # served at 0 from the start, so an alert on it has a series to watch
        self._has_endpoints = asyncio.Event()
        self.endpoints: dict[str, Endpoint] = {}  # ready: new calls go to these
        self.held: dict[str, Endpoint] = {}       # in the pool, out of rotation: facts not read yet, or refused
        self.draining: set[Endpoint] = set()      # removed, with calls still in flight
        self._reads = itertools.count(1)
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
        eps = [*self.endpoints.values(), *self.held.values(), *self.draining]
        for ep in eps:
            await self._stop_watching(ep)
        for ep in eps:
            await ep.channel.close()
        self.endpoints.clear()
        self.held.clear()
        self.draining.clear()
        self._count()
        await asyncio.gather(*self._closing)

    def set_endpoints(self, addrs: Iterable[str]) -> None:
        """The pool is now exactly these addresses: new ones get a channel, the others drain."""
        addrs, known = set(addrs), self.endpoints.keys() | self.held.keys()
        added, removed = addrs - known, known - addrs
        for addr in added:
            channel = create_channel(addr, CHANNEL_OPTIONS, self.credentials, self.server_name)
            ep = Endpoint(addr, channel, self.stub_class(channel))
            if self.check is None:
                self.endpoints[addr] = ep
            else:  # in rotation once its facts pass
                self.held[addr] = ep
                ep.watcher = asyncio.get_running_loop().create_task(self._watch(ep))
        for addr in removed:
            ep = self.endpoints.pop(addr, None) or self.held.pop(addr)
            if ep.watcher:
                ep.watcher.cancel()
            ep.draining = True
            self.draining.add(ep)
            self._close_if_idle(ep)
        self._rotation_changed()
        if added or removed:
            log.info("%s pool: %s (added %s, removed %s)", self.name, sorted(self.endpoints) or "no endpoints",
                     sorted(added), sorted(removed))

    def infos(self) -> list[pb.ModelInfo]:
        """The facts of the endpoints in rotation, the most recently read last (pools with a `check`)."""
        return [ep.info for ep in sorted(self.endpoints.values(), key=lambda ep: ep.read_at) if ep.info]

    def unchecked(self) -> list[str]:
        """Endpoints out of rotation until their facts are read (new, or reconnecting)."""
        return [addr for addr, ep in self.held.items() if not ep.refused]

    def refused(self) -> dict[str, str]:
        """Why each endpoint that `check` refused is out of rotation."""
        return {addr: ep.refused for addr, ep in self.held.items() if ep.refused}

    def recheck(self) -> None:
        """Read every endpoint's facts again (the caller saw something only other weights would explain)."""
        for ep in [*self.endpoints.values(), *self.held.values()]:
            ep.recheck.set()

    async def _watch(self, ep: Endpoint) -> None:
        """Read the endpoint's facts on connection, then again after each reconnection or `recheck`. Out of
        rotation while they are unknown (not read yet, or its connection dropped: who answers now is not known)."""
        ready = grpc.ChannelConnectivity.READY
        while True:
            ep.recheck.clear()
            try:  # wait_for_ready: connects (again), and waits for the address to answer
                info = await ep.stub.Info(pb.InfoRequest(), timeout=self.info_timeout_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                self._hold(ep)
                log.debug("%s pool: %s facts not read: %s", self.name, ep.addr, e.code())
                await asyncio.sleep(min(1.0, self.info_timeout_s))
                continue
            self._judge(ep, info)
            state = ep.channel.get_state()
            while state == ready and not ep.recheck.is_set():
                changed = asyncio.ensure_future(ep.channel.wait_for_state_change(state))
                asked = asyncio.ensure_future(ep.recheck.wait())
                try:
                    await asyncio.wait([changed, asked], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                    asked.cancel()
                state = ep.channel.get_state()
            if state != ready:
                self._hold(ep)

    def _judge(self, ep: Endpoint, info: pb.ModelInfo) -> None:
        """Put an endpoint whose facts were just read in rotation, or keep it out saying why."""
        reason = self.check(info)
        was, ep.info, ep.read_at = ep.refused, info, next(self._reads)
        ep.refused = reason
        if reason:
            if reason != was:
                POOL_MISMATCHES.labels(self.name).inc()
                log.warning("%s pool: %s kept out of rotation: %s", self.name, ep.addr, reason)
            self._hold(ep)
        elif ep.addr in self.held:
            if was:
                log.warning("%s pool: %s back in rotation (%s)", self.name, ep.addr, info.checkpoint)
            self.endpoints[ep.addr] = self.held.pop(ep.addr)
            self._rotation_changed()

    def _hold(self, ep: Endpoint) -> None:
        if ep.addr in self.endpoints:
            self.held[ep.addr] = self.endpoints.pop(ep.addr)
        self._rotation_changed()

    def _rotation_changed(self) -> None:
        if self.endpoints:
            self._has_endpoints.set()
        else:
            self._has_endpoints.clear()
        self._count()

    def _count(self) -> None:
        refused = sum(1 for ep in self.held.values() if ep.refused)
        for state, n in (("serving", len(self.endpoints)), ("refused", refused),
                         ("unchecked", len(self.held) - refused)):
            POOL_ENDPOINTS.labels(self.name, state).set(n)

    async def _stop_watching(self, ep: Endpoint) -> None:
        if ep.watcher:
            ep.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ep.watcher

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

    async def stream(self, method: str, request, affinity: str | None = None, **kwargs) -> AsyncIterator:
        """The responses of a server-streaming `method`; outstanding until the stream ends or the caller closes
        (or cancels) it. Retried once on another endpoint if the first was unreachable before any response."""
        await self._endpoints_up()
        tried: list[Endpoint] = []
        while True:
            ep, code, started = self._acquire(tried, affinity), None, False
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

    async def _endpoints_up(self) -> None:
        if not self.endpoints and self.wait_s > 0:
            with contextlib.suppress(TimeoutError):  # still none: _acquire says so
                await asyncio.wait_for(self._has_endpoints.wait(), self.wait_s)

    def _acquire(self, tried: list[Endpoint], affinity: str | None = None) -> Endpoint:
        candidates = [ep for ep in self.endpoints.values() if ep not in tried]
        if not candidates:
            raise unavailable(f"no ready endpoint in the {self.name} pool")
        now = time.monotonic()
        # With every endpoint ejected, try them anyway: better than refusing all calls for the ejection period.
        candidates = [ep for ep in candidates if ep.ejected_until <= now] or candidates
        least = min(ep.outstanding for ep in candidates)
        preferred = max(candidates, key=lambda ep: _rank(affinity, ep.addr)) if affinity else None
        if preferred is not None and preferred.outstanding <= least + AFFINITY_SLACK:
            ep = preferred
        else:
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
