"""The gateway's client-side balancing over pool replicas: real vision and decoder processes (two of each, started
once), endpoints from a static list, from DNS, or from EndpointSlices through a fake Kubernetes API server."""
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import grpc
import httpx
import numpy as np
import pytest
from kubernetes.aio import client as kube_client
from prometheus_client.parser import text_string_to_metric_families

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.gateway.balancer import AFFINITY_SLACK, Balancer, watch_addresses, watch_endpoint_slices
from services.gateway.chat import ChatService, Limits, Pools
from services.gateway.errors import ApiError
from tests.conftest import data_url, noise_image
from tests.fake_kube_api import FakeKubeApi, endpoint_slice
from tools.run_local import ROOT, free_port, start_stack

GENERATE = pb.GenerateRequest(token_ids=[1, 2, 3, 4], sampling=pb.SamplingParams(max_tokens=4))


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    """`make run` with VISION_REPLICAS=2 DECODER_REPLICAS=2 (no Redis: every image goes to the vision pool)."""
    log_path = tmp_path_factory.mktemp("replicas") / "stack.log"
    with open(log_path, "w") as log:
        try:
            s = start_stack(str(tiny_checkpoint), redis=False, log=log, vision_replicas=2, decoder_replicas=2)
        except Exception:
            print(log_path.read_text())
            raise
        yield s
        s.stop()


def counter(url: str, name: str) -> float:
    """A replica's own counter, summed over its labels."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def decoder_counts(stack) -> dict[str, float]:
    return {a: counter(u, "decoder_requests_total") for a, u in zip(stack.decoder_addrs, stack.decoder_metrics_urls)}


async def counted(stack, before: dict[str, float], calls: int) -> dict[str, float]:
    """Each decoder replica's new calls, once they add up to `calls` (a replica counts a call as it ends)."""
    def new():
        now = decoder_counts(stack)
        return {a: now[a] - before[a] for a in now} if sum(now.values()) - sum(before.values()) >= calls else None
    return await wait_for(new, f"{calls} calls counted by the replicas")


async def wait_for(condition, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return result


async def generate(balancer: Balancer, request=GENERATE) -> list[pb.GenerateResponse]:
    return [r async for r in balancer.stream("Generate", request)]


def static_balancer(addrs: list[str], **kwargs) -> Balancer:
    return Balancer("LLM decoder", pb_grpc.LlmDecoderStub, **kwargs).start(
        lambda update: watch_addresses(",".join(addrs), update))


class FakeDecoder(pb_grpc.LlmDecoderServicer):
    """An in-process decoder: counts calls; `fail` aborts Generate with UNAVAILABLE before ("before") or after
    ("after") the first response; `Info` answers `info`."""

    def __init__(self, fail: str | None = None, info: pb.ModelInfo = pb.ModelInfo(model="fake")):
        self.calls, self.fail, self.info = 0, fail, info

    async def Generate(self, request, context):
        self.calls += 1
        if self.fail == "before":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
        yield pb.GenerateResponse(token_ids=[7], text="a")
        if self.fail == "after":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
        yield pb.GenerateResponse(token_ids=[8], text="b", finish_reason="length")

    async def Info(self, request, context):
        return self.info


async def serve_fake(decoder: FakeDecoder, *addrs: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_LlmDecoderServicer_to_server(decoder, server)
    for addr in addrs:
        assert server.add_insecure_port(addr)
    await server.start()
    return server


# ---------------------------------------------------------------- the gateway over two replicas of each pool

async def test_gateway_spreads_requests_over_both_replicas_of_each_pool(stack):
    """Images over the vision replicas; text-only chats (no affinity key) over the decoder replicas."""
    def chat(content):
        return {"model": "tiny-internvl2_5", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}

    vision_before = [counter(u, "vision_encode_requests_total") for u in stack.vision_metrics_urls]
    before = decoder_counts(stack)
    async with httpx.AsyncClient(timeout=60) as http:
        responses = await asyncio.gather(*(http.post(stack.gateway_url + "/v1/chat/completions", json=chat([
            {"type": "image_url", "image_url": {"url": data_url(noise_image(64, 64, seed=100 + i))}},
            {"type": "text", "text": "Describe."}])) for i in range(8)))
        await counted(stack, before, 8)
        before = decoder_counts(stack)
        responses += await asyncio.gather(*(http.post(stack.gateway_url + "/v1/chat/completions",
                                                      json=chat(f"Say {i}.")) for i in range(8)))
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses]
    vision = [counter(u, "vision_encode_requests_total") - b for u, b in zip(stack.vision_metrics_urls, vision_before)]
    decoder = list((await counted(stack, before, 8)).values())
    assert sum(vision) == 8 and min(vision) >= 2, vision
    assert sum(decoder) == 8 and min(decoder) >= 2, decoder


async def test_calls_about_one_image_go_to_one_replica_while_its_load_allows():
    """Calls with an affinity key (the gateway's: a request's first image) go to the replica the key ranks first,
    the keys spread over the replicas; a replica AFFINITY_SLACK + 1 calls beyond the other gives its keys' next call
    to the other."""
    decoders = [FakeDecoder(), FakeDecoder()]
    addrs = [f"127.0.0.1:{free_port()}" for _ in decoders]
    servers = [await serve_fake(d, a) for d, a in zip(decoders, addrs)]
    balancer = static_balancer(addrs)
    try:
        await wait_for(lambda: len(balancer.endpoints) == 2, "the endpoints")

        async def call(key: str) -> int:
            before = [d.calls for d in decoders]
            assert len([r async for r in balancer.stream("Generate", GENERATE, affinity=key)]) == 2
            return next(i for i, d in enumerate(decoders) if d.calls > before[i])

        owner = {}
        for key in [f"ns:{i}" for i in range(12)]:
            for _ in range(3):
                replica = await call(key)
                assert owner.setdefault(key, replica) == replica, key
        assert set(owner.values()) == {0, 1}  # 2 ** -11 to fail by chance
        key = next(k for k, i in owner.items() if i == 0)
        held = [balancer.stream("Generate", GENERATE, affinity=key) for _ in range(AFFINITY_SLACK + 1)]
        for stream in held:  # in flight on replica 0 (their second responses left unread)
            await anext(stream)
        assert balancer.load() == {addrs[0]: AFFINITY_SLACK + 1, addrs[1]: 0}
        assert await call(key) == 1  # replica 0 is AFFINITY_SLACK + 1 calls beyond replica 1
        for stream in held:
            await stream.aclose()
        assert await call(key) == 0  # and back once it is not
    finally:
        await balancer.close()
        for server in servers:
            await server.stop(None)


def test_gateway_finds_the_pools_through_endpoint_slices(stack, tiny_checkpoint, tmp_path):
    """VISION_SERVICE / DECODER_SERVICE: the gateway process lists and watches the Services' EndpointSlices (through
    a kubeconfig naming the fake API server and the namespace); a pod made not ready gets no more calls."""
    port = lambda addr: int(addr.rsplit(":", 1)[1])  # noqa: E731
    with FakeKubeApi() as api:
        for service, addrs in (("vision", stack.vision_addrs), ("decoder", stack.decoder_addrs)):
            for i, addr in enumerate(addrs):
                api.apply("serving", endpoint_slice(f"{service}-{i}", service, {"127.0.0.1": True}, port(addr)))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": api.url}}], "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "serving"}}]}))
        env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "POD_NAMESPACE")}
        env.update(PYTHONPATH=str(ROOT), KUBECONFIG=str(kubeconfig), VISION_SERVICE="vision",
                   DECODER_SERVICE="decoder", REDIS_URL="", VISION_ADDR="127.0.0.1:1", DECODER_ADDR="127.0.0.1:1")
        rest, log_path = free_port(), tmp_path / "gateway.log"
        with open(log_path, "w") as log:
            gateway = subprocess.Popen([sys.executable, "-m", "services.gateway", "--model", str(tiny_checkpoint),
                                        "--host", "127.0.0.1", "--port", str(rest), "--grpc-port", str(free_port())],
                                       cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{rest}/v1/chat/completions"
            deadline = time.monotonic() + 60
            while True:
                assert gateway.poll() is None and time.monotonic() < deadline, log_path.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{rest}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.2)

            def chat(content) -> None:
                r = httpx.post(url, timeout=60, json={"model": "tiny-internvl2_5", "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": content}]})
                assert r.status_code == 200, r.text

            def decoder_calls(after: list[float]) -> list[float]:
                """The decoders' counts once they reach `after`'s total (a replica counts a call as it ends)."""
                deadline = time.monotonic() + 10
                while sum(now := list(decoder_counts(stack).values())) < sum(after):
                    assert time.monotonic() < deadline, (now, after)
                    time.sleep(0.02)
                return now

            def chats(n: int) -> tuple[list[float], list[float]]:
                """n chats with an image (for the vision pool), then n without (for the decoder pool: no affinity)."""
                vision_before = [counter(u, "vision_encode_requests_total") for u in stack.vision_metrics_urls]
                decoder_before = list(decoder_counts(stack).values())
                for i in range(n):
                    chat([{"type": "image_url", "image_url": {"url": data_url(noise_image(32, 32, seed=200 + i))}},
                          {"type": "text", "text": "Hi"}])
                vision = [counter(u, "vision_encode_requests_total") - b
                          for u, b in zip(stack.vision_metrics_urls, vision_before)]
                decoder_before = decoder_calls([sum(decoder_before) + n])
                for i in range(n):
                    chat(f"Hi {i}")
                after = decoder_calls([sum(decoder_before) + n])
                return vision, [a - b for a, b in zip(after, decoder_before)]

            vision, decoder = chats(4)  # one at a time: round-robin between the idle replicas
            assert vision == [2, 2] and decoder == [2, 2], (vision, decoder)
            not_ready = endpoint_slice("decoder-1", "decoder", {"127.0.0.1": False}, port(stack.decoder_addrs[1]))
            api.apply("serving", not_ready)
            removed = f"removed ['{stack.decoder_addrs[1]}']"
            deadline = time.monotonic() + 10
            while removed not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            vision, decoder = chats(4)
            assert vision == [2, 2] and decoder == [4, 0], (vision, decoder)
        finally:
            gateway.terminate()
            gateway.wait(10)


# ---------------------------------------------------------------- choice: least outstanding

async def test_concurrent_streams_are_split_evenly(stack):
    balancer = static_balancer(stack.decoder_addrs)
    try:
        await wait_for(lambda: len(balancer.endpoints) == 2, "the endpoints")
        before = decoder_counts(stack)
        results = await asyncio.gather(*(generate(balancer) for _ in range(16)))
        assert all(r[-1].finish_reason == "length" for r in results)
        # Every call picks before any ends, so least-outstanding alternates: 8 each, by each replica's own count.
        assert list((await counted(stack, before, 16)).values()) == [8, 8]
        assert balancer.load() == {a: 0 for a in stack.decoder_addrs}
    finally:
        await balancer.close()


async def test_a_long_call_on_one_replica_sends_the_next_calls_to_the_other(stack):
    balancer = static_balancer(stack.decoder_addrs)
    try:
        await wait_for(lambda: len(balancer.endpoints) == 2, "the endpoints")
        before = decoder_counts(stack)
        long = balancer.stream("Generate", pb.GenerateRequest(token_ids=[1, 2, 3],
                                                             sampling=pb.SamplingParams(max_tokens=64)))
        first = await anext(long)  # in flight: the rest stays unread
        pinned = next(a for a, n in balancer.load().items() if n == 1)
        other = next(a for a in stack.decoder_addrs if a != pinned)
        assert balancer.load() == {pinned: 1, other: 0}
        for _ in range(4):
            await generate(balancer)
        rest = [r async for r in long]
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 64
        assert rest[-1].finish_reason == "length" and balancer.load() == {pinned: 0, other: 0}
        new = await counted(stack, before, 5)
        assert (new[pinned], new[other]) == (1, 4)
    finally:
        await balancer.close()


# ---------------------------------------------------------------- Kubernetes EndpointSlices: watch, drain, re-list

async def test_endpoint_slices_drive_the_pool_and_removed_endpoints_drain(stack):
    (addr_a, addr_b), port = stack.decoder_addrs, lambda addr: int(addr.rsplit(":", 1)[1])
    slices = {addr_a: "decoder-a", addr_b: "decoder-b"}

    def publish(addr: str, ready: bool, event: bool = True) -> None:
        api.apply("serving", endpoint_slice(slices[addr], "decoder", {"127.0.0.1": ready}, port(addr)), event)

    with FakeKubeApi() as api:
        publish(addr_a, True)
        publish(addr_b, True)
        api.apply("serving", endpoint_slice("vision-x", "vision", {"10.9.9.9": True}, 50051))  # another Service's
        api.apply("other-ns", endpoint_slice("decoder-z", "decoder", {"10.9.9.8": True}, 50052))  # another namespace's
        kube = kube_client.ApiClient(kube_client.Configuration(host=api.url))
        balancer = Balancer("LLM decoder", pb_grpc.LlmDecoderStub).start(
            lambda update: watch_endpoint_slices(kube, "serving", "decoder", update, backoff_s=0.05))
        try:
            await wait_for(lambda: set(balancer.endpoints) == {addr_a, addr_b}, "both endpoints")
            await wait_for(lambda: len(api.requests) == 2, "the watch")
            assert api.requests == ["list", f"watch {api.version}"]  # list, then watch from the list's version
            before = decoder_counts(stack)
            stream = balancer.stream("Generate", pb.GenerateRequest(token_ids=[1, 2, 3],
                                                                   sampling=pb.SamplingParams(max_tokens=32)))
            first = await anext(stream)
            pinned = next(a for a, n in balancer.load().items() if n == 1)
            other = addr_b if pinned == addr_a else addr_a

            publish(pinned, ready=False)  # the pod is terminating: serving, not ready
            await wait_for(lambda: set(balancer.endpoints) == {other}, "the not-ready endpoint to leave")
            (draining,) = balancer.draining
            assert draining.addr == pinned and draining.outstanding == 1
            for _ in range(3):
                await generate(balancer)
            assert draining.calls == 1 and balancer.endpoints[other].calls == 3
            rest = [r async for r in stream]  # the in-flight stream finishes normally on the drained endpoint
            assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 32
            assert rest[-1].finish_reason == "length"
            assert not balancer.draining  # its last call ended: the channel is closed
            await wait_for(lambda: draining.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN,
                           "the drained channel to close")
            new = await counted(stack, before, 4)
            assert (new[pinned], new[other]) == (1, 3)

            # A change the watch missed (history compacted: 410 Gone) is found by listing again.
            lists = api.requests.count("list")
            publish(pinned, ready=True, event=False)
            api.expire()
            await wait_for(lambda: set(balancer.endpoints) == {addr_a, addr_b}, "the re-listed endpoint")
            assert api.requests.count("list") == lists + 1

            # API errors: back off and retry, keeping the endpoints meanwhile.
            api.fail_next = 2  # the watch's own reconnection, then a list
            api.expire()
            await wait_for(lambda: api.requests.count("list") == lists + 2, "the failed list")
            assert set(balancer.endpoints) == {addr_a, addr_b}
            await wait_for(lambda: api.requests.count("list") == lists + 3 and api.requests[-1].startswith("watch"),
                           "the retried list and a new watch")

            api.delete("serving", slices[addr_a])
            api.delete("serving", slices[addr_b])
            await wait_for(lambda: not balancer.endpoints, "an empty pool")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await generate(balancer)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "no ready endpoint" in e.value.details()
            # ... which the gateway answers with 503.
            chat = ChatService("m", None, Pools(balancer, balancer, "", 256, 4096), None, None, Limits())
            with pytest.raises(ApiError) as e:
                [r async for r in chat.generate([GENERATE], None)]
            assert e.value.status == 503 and "no ready endpoint in the LLM decoder pool" in e.value.message
        finally:
            await balancer.close()
            await kube.close()


# ---------------------------------------------------------------- unreachable endpoints: retry, eject, come back

async def test_unreachable_endpoint_is_ejected_retried_elsewhere_and_tried_again_later(stack):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    balancer = static_balancer([dead, *stack.decoder_addrs], eject_s=1.0)
    server = None
    try:
        await wait_for(lambda: len(balancer.endpoints) == 3, "the endpoints")
        for _ in range(3):  # round-robin reaches it within three calls; each still succeeds
            assert (await generate(balancer))[-1].finish_reason == "length"
            if dead in balancer.ejected():
                break
        assert balancer.endpoints[dead].calls == 1 and dead in balancer.ejected()
        while dead in balancer.ejected():  # ejected: no calls
            await generate(balancer)
        assert balancer.endpoints[dead].calls == 1
        for _ in range(3):  # back: tried again, still dead: ejected twice as long
            assert (await generate(balancer))[-1].finish_reason == "length"
            if balancer.endpoints[dead].calls == 2:
                break
        assert balancer.ejected()[dead] > 1.5

        fake = FakeDecoder()
        server = await serve_fake(fake, dead)  # the replica comes back
        await wait_for(lambda: dead not in balancer.ejected(), "the second ejection to end", timeout_s=5)
        for _ in range(3):
            await generate(balancer)
        assert fake.calls >= 1 and balancer.endpoints[dead].ejections == 0
    finally:
        await balancer.close()
        if server:
            await server.stop(None)


async def test_unary_encode_is_retried_on_another_vision_replica(stack, cfg):
    dead = f"127.0.0.1:{free_port()}"
    balancer = Balancer("vision encoder", pb_grpc.VisionEncoderStub)
    balancer.set_endpoints([dead, stack.vision_addrs[0]])
    try:
        size = cfg.vision.image_size
        tiles = np.zeros((1, size, size, 3), np.uint8)
        request = pb.EncodeRequest(request_id=uuid.uuid4().hex, images=[
            pb.ImageTiles(tiles=pb.Tensor(dtype="uint8", shape=tiles.shape, data=tiles.tobytes()))])
        for _ in range(2):  # one of the two goes to the dead one first
            response = await balancer.unary("Encode", request, timeout=30)
            assert response.images[0].embeddings.shape[0] == cfg.tokens_per_tile
        assert balancer.endpoints[dead].calls == 1 and dead in balancer.ejected()
    finally:
        await balancer.close()


async def test_a_stream_is_retried_only_before_its_first_response():
    fakes = {"before": FakeDecoder(fail="before"), "after": FakeDecoder(fail="after"), "good": FakeDecoder()}
    addrs = {name: f"127.0.0.1:{free_port()}" for name in fakes}
    servers = [await serve_fake(fakes[name], addr) for name, addr in addrs.items()]
    try:
        for failing in ("before", "after"):
            balancer = Balancer("LLM decoder", pb_grpc.LlmDecoderStub)
            balancer.set_endpoints([addrs[failing], addrs["good"]])
            outcomes = []
            for _ in range(2):  # round-robin: the first or the second call starts there
                if fakes[failing].calls:
                    break
                try:
                    outcomes.append((await generate(balancer))[-1].finish_reason)
                except grpc.aio.AioRpcError as e:
                    outcomes.append(e.code())
            # Failed before any response: retried on the good one. After one: the caller sees the failure.
            expected = "length" if failing == "before" else grpc.StatusCode.UNAVAILABLE
            assert fakes[failing].calls == 1 and outcomes[-1] == expected
            assert fakes["good"].calls == sum(o == "length" for o in outcomes)
            fakes["good"].calls = 0
            await balancer.close()
    finally:
        for s in servers:
            await s.stop(None)


# ---------------------------------------------------------------- without API access: DNS names, static lists

async def test_dns_name_is_re_resolved_each_address_an_endpoint():
    port = free_port()
    fakes = FakeDecoder(), FakeDecoder()
    servers = [await serve_fake(fakes[0], f"127.0.0.1:{port}"), await serve_fake(fakes[1], f"127.0.0.2:{port}")]
    answers = {"pool.test": ["127.0.0.1", "127.0.0.2"]}
    resolutions = 0

    async def resolve(host: str, _port: int) -> list[str]:
        nonlocal resolutions
        resolutions += 1
        if isinstance(answers[host], Exception):
            raise answers[host]
        return answers[host]

    balancer = Balancer("LLM decoder", pb_grpc.LlmDecoderStub).start(
        lambda update: watch_addresses(f"dns:///pool.test:{port}", update, interval_s=0.02, resolve=resolve))
    try:
        both = {f"127.0.0.1:{port}", f"127.0.0.2:{port}"}
        await wait_for(lambda: set(balancer.endpoints) == both, "both addresses")
        await asyncio.gather(*(generate(balancer) for _ in range(8)))
        assert [f.calls for f in fakes] == [4, 4]
        answers["pool.test"] = ["127.0.0.2"]
        await wait_for(lambda: set(balancer.endpoints) == {f"127.0.0.2:{port}"}, "the address to go")
        answers["pool.test"] = ["127.0.0.1", "127.0.0.2"]
        await wait_for(lambda: set(balancer.endpoints) == both, "the address to come back")
        answers["pool.test"], failed_from = socket.gaierror(socket.EAI_AGAIN, "temporary failure"), resolutions
        await wait_for(lambda: resolutions >= failed_from + 3, "failed resolutions")
        assert set(balancer.endpoints) == both  # a resolver hiccup: the pool keeps what it had
        answers["pool.test"] = socket.gaierror(socket.EAI_NONAME, "no such name")
        await wait_for(lambda: not balancer.endpoints, "an empty pool")
    finally:
        await balancer.close()
        for s in servers:
            await s.stop(None)


async def test_static_list_and_real_dns_name_together(stack):
    """A static entry plus `dns:///localhost:PORT`, resolved with getaddrinfo (127.0.0.1, and ::1 where configured)."""
    port_b = stack.decoder_addrs[1].rsplit(":", 1)[1]
    balancer = static_balancer([stack.decoder_addrs[0], f"dns:///localhost:{port_b}"])
    try:
        await wait_for(lambda: f"127.0.0.1:{port_b}" in balancer.endpoints, "the resolved name")
        for _ in range(2 * len(balancer.endpoints)):  # each succeeds (one on an unreachable ::1 is retried)
            assert (await generate(balancer))[-1].finish_reason == "length"
        assert all(balancer.endpoints[a].calls >= 1 for a in (stack.decoder_addrs[0], f"127.0.0.1:{port_b}"))
    finally:
        await balancer.close()
