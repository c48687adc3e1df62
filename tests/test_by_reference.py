"""Embeddings by reference: the gateway names images by cache key, the decoder reads their rows from Redis itself
(or takes its recent copy); a value gone by then is sent inline, never a wrong answer."""
import hashlib
import time

import grpc
import pytest
import redis

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common.cache import image_cache_key
from services.gateway.tiling import choose_grid, tile_count, tile_image
from services.llm_decoder.server import RecentImages
from tests.conftest import data_url, noise_image, png_bytes
from tests.test_end_to_end import MODEL, metric


def ask(client, image, max_tokens: int = 6) -> list[int]:
    answer = client.chat.completions.create(
        model=MODEL, max_tokens=max_tokens, temperature=0, extra_body={"max_num": 4, "return_token_ids": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": "Describe it."}]}])
    return answer.choices[0].token_ids


def embeddings(stack) -> dict[str, float]:
    return {source: metric(stack.decoder_metrics_url, "decoder_image_embeddings_total", source=source)
            for source in ("inline", "cache", "local", "missing")}


def value_reads(store: redis.Redis) -> int:
    """GET commands Redis has served (only the decoder reads values whole: the gateway asks STRLEN)."""
    return store.info("commandstats").get("cmdstat_get", {}).get("calls", 0)


def moved(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def test_images_reach_the_decoder_by_cache_key(client, stack, redis_url):
    """A miss is stored by the vision pool before it answers and read by the decoder from Redis; the next question
    about the image is a hit, its rows the decoder's recent copy (no read of the value), with the same answer (equal
    to the reference's: tests/test_end_to_end.py runs through this path)."""
    store = redis.Redis.from_url(redis_url)
    image = noise_image(500, 300, seed=808)
    keys = set(store.keys())
    before = embeddings(stack)
    first = ask(client, image)
    [key] = set(store.keys()) - keys  # written before the answer, not after it
    assert moved(before, embeddings(stack)) == {"inline": 0, "cache": 1, "local": 0, "missing": 0}
    reads = value_reads(store)
    assert ask(client, image) == first
    assert moved(before, embeddings(stack)) == {"inline": 0, "cache": 1, "local": 1, "missing": 0}
    assert value_reads(store) == reads
    assert store.strlen(key) > 4 * 256 * 4  # rows of 4-byte floats (at least one tile's) are in Redis


def gateway_key(stack, image) -> str:
    """The cache key the stack's gateway gives `image` (sent as a PNG data URL, max_num 4)."""
    with grpc.insecure_channel(stack.vision_addrs[0]) as channel:
        fingerprint = pb_grpc.VisionEncoderStub(channel).Info(pb.InfoRequest()).fingerprint
    return image_cache_key(stack.cache_namespace, fingerprint, hashlib.sha256(png_bytes(image)).hexdigest(), 4, True,
                           448)


def test_a_value_gone_from_the_cache_is_sent_inline(client, stack, redis_url):
    """The gateway sees the key, the decoder (which has not read it before) finds garbage under it: the call fails
    before any token and the gateway sends the rows inline; the answer is the one the image gets from a good value."""
    store = redis.Redis.from_url(redis_url)
    image = noise_image(320, 410, seed=909)
    store.set(gateway_key(stack, image), b"\x00corrupt" * 64)  # present for the gateway's look-up, unusable after
    before = embeddings(stack)
    got = ask(client, image)
    assert moved(before, embeddings(stack)) == {"inline": 1, "cache": 0, "local": 0, "missing": 1}
    assert "sending the rows inline" in stack.log_path.read_text()
    # The inline call's encode wrote the image's value behind the answer; once there, it is read by key.
    for _ in range(50):
        if store.strlen(gateway_key(stack, image)) > 64 * 8:
            break
        time.sleep(0.1)
    assert ask(client, image) == got
    assert moved(before, embeddings(stack)) == {"inline": 1, "cache": 1, "local": 0, "missing": 1}


def test_recent_images_hold_the_latest_within_their_bytes():
    """The decoder's recent images: least recently used out first, never more bytes than the bound, a key's rows
    only for the row count asked, nothing held when the bound is 0."""
    def item(rows: int) -> tuple[pb.Tensor, memoryview]:
        return pb.Tensor(dtype="bfloat16", shape=[rows, 4]), memoryview(bytearray(rows * 8))

    recent = RecentImages(max_bytes=100)
    for key in "abc":
        recent.put(key, *item(4))  # 32 bytes each
    assert recent.get("a", 4) is not None and recent.get("a", 5) is None  # "a" used last: "b" goes first
    recent.put("d", *item(4))
    assert list(recent.items) == ["c", "a", "d"] and recent.bytes == 96
    recent.put("e", *item(12))  # 96 bytes: all the others go
    assert list(recent.items) == ["e"] and recent.bytes == 96
    recent.put("f", *item(13))  # larger than the bound: not held, nothing evicted for it
    assert list(recent.items) == ["e"]
    off = RecentImages(max_bytes=0)
    off.put("a", *item(1))
    assert not off.items and off.get("a", 1) is None


@pytest.fixture(scope="module")
def decoder(stack):
    with grpc.insecure_channel(stack.decoder_addrs[0]) as channel:
        yield pb_grpc.LlmDecoderStub(channel)


def test_the_decoder_refuses_keys_it_cannot_read(decoder, cfg, redis_url):
    """Absent, corrupt, or holding another row count than the prompt needs: FAILED_PRECONDITION, no tokens."""
    store = redis.Redis.from_url(redis_url)
    store.set("by-ref-test:corrupt", b"not a CachedEmbeddings value")
    ids = [5, 6] + [cfg.image_token_id] * cfg.tokens_per_tile + [7]
    for key in ("by-ref-test:absent", "by-ref-test:corrupt"):
        with pytest.raises(grpc.RpcError) as e:
            list(decoder.Generate(pb.GenerateRequest(
                token_ids=ids, images=[pb.ImageEmbeddings(cache_key=key, rows=cfg.tokens_per_tile)],
                sampling=pb.SamplingParams(max_tokens=2)), timeout=30))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and key in e.value.details()


@pytest.mark.parametrize("size,max_num", [((500, 300), 4), ((300, 500), 12), ((448, 448), 6), ((1000, 90), 12),
                                           ((90, 1000), 1), ((2000, 1500), 12), ((640, 480), 2), ((17, 19), 12)])
def test_tile_count_from_the_header_equals_tiling(size, max_num):
    """On a hit the gateway counts tiles from the image's size alone: the same count as cutting the image."""
    image = noise_image(*size, seed=1)
    for thumbnail in (True, False):
        assert tile_count(*size, max_num, use_thumbnail=thumbnail) == \
            tile_image(image, max_num=max_num, use_thumbnail=thumbnail).shape[0]
    cols, rows = choose_grid(*size, max_num=max_num)
    assert tile_count(*size, max_num, use_thumbnail=False) == cols * rows
