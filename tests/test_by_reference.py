"""Embeddings by reference: the gateway names images by cache key, the decoder reads their rows from Redis itself;
a value gone by then is sent inline, never a wrong answer."""
import grpc
import pytest
import redis

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.gateway.tiling import choose_grid, tile_count, tile_image
from tests.conftest import data_url, noise_image
from tests.test_end_to_end import MODEL, metric


def ask(client, image, max_tokens: int = 6) -> list[int]:
    answer = client.chat.completions.create(
        model=MODEL, max_tokens=max_tokens, temperature=0, extra_body={"max_num": 4, "return_token_ids": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": "Describe it."}]}])
    return answer.choices[0].token_ids


def embeddings(stack) -> dict[str, float]:
    return {source: metric(stack.decoder_metrics_url, "decoder_image_embeddings_total", source=source)
            for source in ("inline", "cache", "missing")}


def moved(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def test_images_reach_the_decoder_by_cache_key(client, stack, redis_url):
    """A miss is stored by the vision pool before it answers, a hit only looked up: both are read by the decoder
    from Redis, with the same answer (equal to the reference's: tests/test_end_to_end.py runs through this path)."""
    store = redis.Redis.from_url(redis_url)
    image = noise_image(500, 300, seed=808)
    keys = set(store.keys())
    before = embeddings(stack)
    first = ask(client, image)
    [key] = set(store.keys()) - keys  # written before the answer, not after it
    assert ask(client, image) == first
    assert moved(before, embeddings(stack)) == {"inline": 0, "cache": 2, "missing": 0}
    assert store.strlen(key) > 4 * 256 * 4  # rows of 4-byte floats (at least one tile's) are in Redis


def test_a_value_gone_from_the_cache_is_sent_inline(client, stack, redis_url):
    """The gateway saw the key, the decoder finds garbage (or nothing) under it: the call fails before any token and
    the gateway sends the rows inline; the answer is the one the image always gets."""
    store = redis.Redis.from_url(redis_url)
    image = noise_image(320, 410, seed=909)
    keys = set(store.keys())
    expected = ask(client, image)
    [key] = set(store.keys()) - keys
    store.set(key, b"\x00corrupt" * 64)  # present for the gateway's look-up, unusable for the decoder
    before = embeddings(stack)
    assert ask(client, image) == expected
    assert moved(before, embeddings(stack)) == {"inline": 1, "cache": 0, "missing": 1}
    assert "sending the rows inline" in stack.log_path.read_text()


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
