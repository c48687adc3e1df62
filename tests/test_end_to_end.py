"""The whole stack as real processes (gateway, vision encoder, LLM decoder, redis-server) against the reference."""
import json
import re
import time
import urllib.request
import uuid

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from tests.conftest import (IMAGE_HOST, data_url, noise_image, noise_video, png_bytes, solid_video,
                            video_data_url)
from tests.reference_preprocess import load_video, reference_pixel_values

MODEL = "tiny-internvl2_5"
MAX_NUM = 4
MAX_TOKENS = 24
IMAGES = [noise_image(500, 300, seed=1), noise_image(240, 700, seed=2), noise_image(448, 448, seed=3)]
VIDEO = noise_video(30, 96, 64, seed=8)  # 3 s at 10 fps
VIDEO_SEGMENTS, VIDEO_BOUND = 4, (0.5, 2.5)


def video_frames() -> list:
    """The cards' pixel_values of each frame (load_video with max_num=1)."""
    import io
    pixels, patches = load_video(io.BytesIO(VIDEO), bound=VIDEO_BOUND, max_num=1, num_segments=VIDEO_SEGMENTS)
    return list(pixels.split(patches))


def image_part(image, **options) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image), **options}}


# (name, OpenAI messages, chat-template messages for the reference, images in order)
CASES = [
    ("text", [{"role": "user", "content": "Tell me about the weather in Shanghai."}],
     [{"role": "user", "content": [{"type": "text", "text": "Tell me about the weather in Shanghai."}]}], []),
    ("one_image",
     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}},
                                   {"type": "text", "text": "Describe the image."}]}],
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
     [IMAGES[0]]),
    ("two_images",
     [{"role": "system", "content": "You are a careful assistant."},
      {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                   {"type": "image_url", "image_url": {"url": data_url(IMAGES[1])}},
                                   {"type": "text", "text": " with "},
                                   {"type": "image_url", "image_url": {"url": data_url(IMAGES[2])}}]}],
     [{"role": "system", "content": [{"type": "text", "text": "You are a careful assistant."}]},
      {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                   {"type": "text", "text": " with "}, {"type": "image"}]}],
     [IMAGES[1], IMAGES[2]]),
    # The cards' multi-image prompt with <image> placeholders: filled in order, as query.replace('<image>', ..., 1).
    ("image_placeholders",
     [{"role": "user", "content": [{"type": "text", "text": "Image-1: <image>\nImage-2: <image>\nWhat differs?"},
                                   image_part(IMAGES[0]), image_part(IMAGES[1])]}],
     [{"role": "user", "content": [{"type": "text",
                                    "text": "Image-1: <IMG_CONTEXT>\nImage-2: <IMG_CONTEXT>\nWhat differs?"}]}],
     [IMAGES[0], IMAGES[1]]),
    # The cards' multi-round chat: the image stays in the first question of the history.
    ("multi_turn",
     [{"role": "user", "content": [image_part(IMAGES[2]), {"type": "text", "text": "What is it?"}]},
      {"role": "assistant", "content": "A noisy picture."},
      {"role": "user", "content": "Which colours dominate?"}],
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A noisy picture."}]},
      {"role": "user", "content": [{"type": "text", "text": "Which colours dominate?"}]}],
     [IMAGES[2]]),
    ("max_dynamic_patch",
     [{"role": "user", "content": [image_part(IMAGES[0], max_dynamic_patch=1), image_part(IMAGES[1]),
                                   {"type": "text", "text": "Two pictures."}]}],
     [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Two pictures."}]}],
     [reference_pixel_values(IMAGES[0], max_num=1), IMAGES[1]]),
    # OpenAI's detail: low is the whole image as one tile, high the server's most (--max-num, 12 by default).
    ("detail",
     [{"role": "user", "content": [image_part(IMAGES[0], detail="high"), image_part(IMAGES[1], detail="low"),
                                   image_part(IMAGES[2], detail="auto"), {"type": "text", "text": "Three."}]}],
     [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "image"},
                                   {"type": "text", "text": "Three."}]}],
     [reference_pixel_values(IMAGES[0], max_num=12), reference_pixel_values(IMAGES[1], max_num=1), IMAGES[2]]),
    # The cards' grounding prompts: <ref>/<box>/<quad> in questions and in an answer of the history are the
    # tokenizer's added tokens, tokenized as the reference tokenizes them.
    ("grounding",
     [{"role": "user", "content": [image_part(IMAGES[2]), {"type": "text", "text": "Please provide the bounding box "
                                   "coordinate of the region this sentence describes: <ref>the dog</ref>"}]},
      {"role": "assistant", "content": "<ref>the dog</ref><box>[[120, 33, 861, 999]]</box>"},
      {"role": "user", "content": "And <quad>this</quad>?"}],
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Please provide the bounding box "
                                   "coordinate of the region this sentence describes: <ref>the dog</ref>"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "<ref>the dog</ref><box>[[120, 33, 861, 999]]</box>"}]},
      {"role": "user", "content": [{"type": "text", "text": "And <quad>this</quad>?"}]}],
     [IMAGES[2]]),
    # The cards' video example: video_prefix + question, one tile per frame.
    ("video",
     [{"role": "user", "content": [{"type": "video_url", "video_url": {
         "url": video_data_url(VIDEO), "num_segments": VIDEO_SEGMENTS, "bound": list(VIDEO_BOUND)}},
         {"type": "text", "text": "What happens?"}]}],
     [{"role": "user", "content": [{"type": "text", "text": "".join(
         f"Frame{i + 1}: <IMG_CONTEXT>\n" for i in range(VIDEO_SEGMENTS)) + "What happens?"}]}],
     video_frames()),
]


def metric(url: str, name: str, **labels) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def to_grpc(messages: list[dict]) -> list[pb.ChatMessage]:
    out = []
    for m in messages:
        content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        parts = []
        for p in content:
            if p["type"] == "text":
                parts.append(pb.ContentPart(text=p["text"]))
            elif p["type"] == "video_url":
                v = p["video_url"]
                parts.append(pb.ContentPart(video=pb.Video(data=_png_of(v["url"]), num_segments=v["num_segments"],
                                                           bound=pb.TimeSpan(start_s=v["bound"][0],
                                                                             end_s=v["bound"][1]))))
            else:  # send the raw bytes: the gRPC API takes images without base64
                parts.append(pb.ContentPart(image_bytes=_png_of(p["image_url"]["url"]),
                                            max_dynamic_patch=p["image_url"].get("max_dynamic_patch"),
                                            detail=p["image_url"].get("detail")))
        out.append(pb.ChatMessage(role=m["role"], content=parts))
    return out


def _png_of(url: str) -> bytes:
    import base64
    return base64.b64decode(url.split(",", 1)[1])


@pytest.fixture(scope="module")
def expected(reference):
    return {name: reference.generate(ref_messages, images, MAX_NUM, MAX_TOKENS)
            for name, _, ref_messages, images in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rest_greedy_equals_reference(client, expected, reference, case):
    name, messages, _, _ = case
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                       extra_body={"max_num": MAX_NUM, "return_token_ids": True})
    choice = r.choices[0]
    assert choice.token_ids == expected[name]
    assert choice.message.content == reference.text(expected[name])
    assert r.usage.completion_tokens == len(expected[name])
    assert choice.finish_reason == ("stop" if expected[name][-1] == reference.tokenizer.eos_token_id else "length")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_grpc_greedy_equals_reference(gateway, expected, case):
    name, messages, _, _ = case
    request = pb.ChatRequest(model=MODEL, messages=to_grpc(messages), max_tokens=MAX_TOKENS, temperature=0,
                             max_num=MAX_NUM)
    answer = gateway.Chat(request, timeout=120)
    assert list(answer.token_ids) == expected[name]
    assert answer.usage.completion_tokens == len(expected[name])
    streamed = list(gateway.ChatStream(request, timeout=120))
    assert [t for r in streamed for t in r.token_ids] == expected[name]
    assert "".join(r.text for r in streamed) == answer.text
    assert streamed[-1].finish_reason == answer.finish_reason != ""


def test_stream_concatenates_to_the_non_streamed_answer(client):
    messages = CASES[1][1]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"max_num": MAX_NUM})
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, extra_body={"max_num": MAX_NUM},
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_repeated_image_skips_the_vision_service(client, stack):
    image = noise_image(333, 517, seed=10)

    def ask(img, max_num):
        client.chat.completions.create(
            model=MODEL, max_tokens=2, temperature=0, extra_body={"max_num": max_num},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}}]}])
        return metric(stack.vision_metrics_url, "vision_images_encoded_total")

    first = ask(image, 2)
    assert ask(image, 2) == first                          # same bytes, same max_num: served from Redis
    assert ask(image, 3) == first + 1                      # max_num is part of the key
    assert ask(noise_image(333, 517, seed=11), 2) == first + 2   # a different image misses


async def test_the_effective_tile_cap_is_in_the_cache_key(client, stack):
    image = noise_image(333, 517, seed=12)

    def ask(max_num, **options):
        client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, extra_body={"max_num": max_num},
                                       messages=[{"role": "user", "content": [image_part(image, **options)]}])
        return metric(stack.vision_metrics_url, "vision_images_encoded_total")

    first = ask(2)
    assert ask(5, max_dynamic_patch=2) == first       # the same effective cap: served from Redis
    assert ask(2, max_dynamic_patch=3) == first + 1   # the image's own cap wins over the request's
    assert ask(2, detail="high", max_dynamic_patch=3) == first + 1   # and over its detail
    assert ask(1) == first + 2
    assert ask(5, detail="low") == first + 2          # one tile, as max_num=1


def test_video_frames_are_cached_by_content(client, stack):
    video = noise_video(20, 64, 48, seed=9)

    def ask(segments):
        client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video_data_url(video), "num_segments": segments}}]}])
        return metric(stack.vision_metrics_url, "vision_images_encoded_total")

    before = metric(stack.vision_metrics_url, "vision_images_encoded_total")
    first = ask(4)
    assert first == before + 4                        # one encoding per frame
    assert ask(4) == first                            # every frame from Redis
    # of 20 frames, 4 segments pick frames 2, 7, 12, 16 and 2 pick 4, 14: two frames not seen yet
    assert ask(2) == first + 2


async def test_concurrent_requests_for_one_image_encode_it_once(stack):
    """Single flight: identical images arriving together (and twice in one request) are encoded once."""
    import asyncio

    image = {"type": "image_url", "image_url": {"url": data_url(noise_image(271, 183, seed=123))}}
    before = metric(stack.vision_metrics_url, "vision_images_encoded_total")
    async with openai.AsyncOpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0) as aclient:
        answers = await asyncio.gather(*(aclient.chat.completions.create(
            model=MODEL, max_tokens=4, temperature=0, extra_body={"max_num": 2, "return_token_ids": True},
            messages=[{"role": "user", "content": [image, image] if i == 0 else [image]}]) for i in range(6)))
    assert metric(stack.vision_metrics_url, "vision_images_encoded_total") == before + 1
    assert len({tuple(a.choices[0].token_ids) for a in answers[1:]}) == 1


def test_cached_answer_equals_uncached(client):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGES[0])}},
                                             {"type": "text", "text": "Again?"}]}]
    answers = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                              extra_body={"max_num": 3, "return_token_ids": True}).choices[0].token_ids
               for _ in range(2)]
    assert answers[0] == answers[1]


def test_concurrent_requests_match_sequential(stack, client):
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(6)]
    sequential = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                                 max_tokens=12, temperature=0).choices[0].message.content
                  for p in prompts]

    async def run():
        import asyncio
        aclient = openai.AsyncOpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)
        rs = await asyncio.gather(*(aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0) for p in prompts))
        return [r.choices[0].message.content for r in rs]

    import asyncio
    assert asyncio.run(run()) == sequential


def test_models_and_health(stack):
    assert httpx.get(stack.gateway_url + "/health").status_code == 200
    assert httpx.get(stack.gateway_url + "/ready").status_code == 200
    models = httpx.get(stack.gateway_url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve(MODEL).model_dump(exclude_none=True) == models["data"][0]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("org/no-such-model")
    assert missing.value.body["code"] == "model_not_found"


BAD_REQUESTS = [
    ("invalid image bytes", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]}, 400),
    ("unknown model", {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("empty messages", {"model": MODEL, "messages": []}, 400),
    ("unknown role", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("bad temperature", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400),
    ("image token in text", {"model": MODEL, "messages": [{"role": "user", "content": "<IMG_CONTEXT>"}]}, 400),
    ("context overflow", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6},
     400),
    ("max_num over limit", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_num": 99}, 400),
    ("unsupported option", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                            "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
    ("unknown field", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "best_of": 2}, 400),
    ("unknown message field", {"model": MODEL, "messages": [
        {"role": "assistant", "content": "hi", "tool_calls": [{"id": "1", "type": "function"}]}]}, 400),
    ("unknown part field", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]}, 400),
    ("unreachable video URL", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}]}]}, 400),
    *[(f"video: {name}", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_data_url(data), **options}}]}]}, 400) for name, data, options in [
        ("not a video", b"definitely not a video file" * 10, {}),
        ("zero size", b"", {}),
        ("truncated", VIDEO[:len(VIDEO) // 3], {}),
        ("too many frames", noise_video(101, 32, 32, seed=1), {}),  # the stack's MAX_VIDEO_FRAMES is 100
        ("huge declared frames", solid_video(4096, 4096), {}),
        ("bound outside the video", VIDEO, {"bound": [10, 12]}),
        ("bound reversed", VIDEO, {"bound": [2, 1]}),
        ("too many segments", VIDEO, {"num_segments": 33}),
    ]],
    ("image placeholders without images", {"model": MODEL, "messages": [
        {"role": "user", "content": "Image-1: <image>\nImage-2: <image>\nCompare."}]}, 400),
    ("max_dynamic_patch over limit", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMAGES[0]), "max_dynamic_patch": 99}}]}]}, 400),
    ("unknown detail", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMAGES[0]), "detail": "ultra"}}]}]}, 400),
    ("penalty out of range", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "presence_penalty": 3}, 400),
    ("bad top_k", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_k": -2}, 400),
    ("bad repetition_penalty", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                "repetition_penalty": 0}, 400),
]


def test_the_decoder_reuses_cached_prefixes(client, stack, gateway):
    """A second turn about the same image (and the same long system prompt) takes cached KV blocks: the decoder's
    prefix-cache counter grows by at least the image's 256 rows, the answer is unchanged, and its usage says how many
    prompt tokens were cached (OpenAI's prompt_tokens_details.cached_tokens), streamed or not, REST and gRPC."""
    image = noise_image(300, 200, seed=77)
    messages = [{"role": "system", "content": "You describe pictures for a catalogue, briefly and exactly. " * 3},
                {"role": "user", "content": [image_part(image), {"type": "text", "text": "What is it?"}]}]
    ask = lambda: client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,  # noqa
                                                 extra_body={"max_num": 1})
    first = ask()
    before = metric(stack.decoder_metrics_url, "decoder_prefix_cache_hit_tokens_total")
    second = ask()
    hits = metric(stack.decoder_metrics_url, "decoder_prefix_cache_hit_tokens_total") - before
    assert second.choices[0].message.content == first.choices[0].message.content and hits >= 256
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < cached == hits < second.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"max_num": 1}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    answer = gateway.Chat(pb.ChatRequest(model=MODEL, messages=to_grpc(messages), max_tokens=8, temperature=0,
                                         max_num=1))
    assert answer.usage.cached_prompt_tokens == cached


def test_sampling_options_reach_the_decoder(client):
    """Penalties change a greedy answer; seeded top-k/min-p answers repeat (and differ from another seed)."""
    def ask(**options):
        r = client.chat.completions.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "Hi"}],
                                           extra_body={"return_token_ids": True, **options.pop("extra", {})},
                                           **options)
        return r.choices[0].token_ids

    greedy = ask(temperature=0)
    assert ask(temperature=0, frequency_penalty=2.0) != greedy
    assert ask(temperature=0, extra={"repetition_penalty": 3.0}) != greedy
    seeded = dict(temperature=1.0, seed=5, extra={"top_k": 20, "min_p": 0.01})
    assert ask(**seeded) == ask(**seeded) != ask(temperature=1.0, seed=6, extra={"top_k": 20, "min_p": 0.01})


@pytest.mark.parametrize("body,status", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_service_keeps_serving(stack, body, status):
    r = httpx.post(stack.gateway_url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"]
    ok = httpx.post(stack.gateway_url + "/v1/chat/completions", timeout=30,
                    json={"model": MODEL, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_malformed_json_is_a_400(stack):
    r = httpx.post(stack.gateway_url + "/v1/chat/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(stack.gateway_url + "/v1/chat/completions", content=b"\xff\xfe{",  # not UTF-8: FastAPI's own 400
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]


LONE_SURROGATES = [  # JSON text as sent; where the gateway says the bad text is
    ('{"model": "%s", "messages": [{"role": "user", "content": "caf\\u00e9 \\ud800"}]}' % MODEL, "messages.0.content"),
    ('{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}' % MODEL,
     "messages.0.content.0.text"),
    ('{"model": "\\ud83d", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}' % MODEL, "stop.0"),
]


@pytest.mark.parametrize("body,where", LONE_SURROGATES, ids=[w for _, w in LONE_SURROGATES])
def test_text_that_is_not_unicode_is_a_400(stack, body, where):
    """JSON escapes can spell half a UTF-16 surrogate pair: a 400 naming the field, not a 500 from the tokenizer."""
    r = httpx.post(stack.gateway_url + "/v1/chat/completions", content=body.encode(),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(f"{where}: the text is not valid Unicode")


def test_an_escaped_surrogate_pair_is_text(stack):
    body = '{"model": "%s", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}' % MODEL
    r = httpx.post(stack.gateway_url + "/v1/chat/completions", content=body.encode(),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text


def test_an_answer_goes_back_as_history(client):
    """A chat loop appends the official client's answer message to the history, as the object or as its
    `model_dump()` (null refusal, tool_calls, audio, ...): both are the same assistant turn as its text alone."""
    question = [{"role": "user", "content": "Name a colour."}]
    answer = client.chat.completions.create(model=MODEL, messages=question, max_tokens=6, temperature=0
                                            ).choices[0].message
    follow = lambda turn: client.chat.completions.create(  # noqa: E731
        model=MODEL, max_tokens=6, temperature=0, extra_body={"return_token_ids": True},
        messages=[*question, turn, {"role": "user", "content": "Another?"}]).choices[0]
    as_text = follow({"role": "assistant", "content": answer.content})
    assert follow(answer).token_ids == follow(answer.model_dump()).token_ids == as_text.token_ids
    with pytest.raises(openai.BadRequestError, match="tool_calls"):
        follow({**answer.model_dump(), "tool_calls": [{"id": "1", "type": "function",
                                                       "function": {"name": "f", "arguments": "{}"}}]})


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}]}])


def test_grpc_errors_have_proper_status(gateway):
    with pytest.raises(grpc.RpcError) as e:
        gateway.Chat(pb.ChatRequest(model="nope", messages=to_grpc([{"role": "user", "content": "hi"}])))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        gateway.Chat(pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(
            role="user", content=[pb.ContentPart(image_bytes=b"GIF89a-broken")])]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for video in (pb.Video(data=b"not a video" * 10), pb.Video(data=VIDEO, num_segments=99), pb.Video(),
                  pb.Video(data=VIDEO, bound=pb.TimeSpan(start_s=20, end_s=30)),
                  pb.Video(data=VIDEO, bound=pb.TimeSpan(start_s=0, end_s=float("inf")))):
        with pytest.raises(grpc.RpcError) as e:
            gateway.Chat(pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(
                role="user", content=[pb.ContentPart(video=video)])]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, video
    for part in (pb.ContentPart(image_bytes=png_bytes(IMAGES[0]), detail="ultra"),
                 pb.ContentPart(text="hi", detail="low"), pb.ContentPart(text="hi", max_dynamic_patch=2)):
        with pytest.raises(grpc.RpcError) as e:
            gateway.Chat(pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content=[part])]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, part
    assert gateway.ListModels(pb.InfoRequest()).models == [MODEL]


def test_http_image_url_equals_data_url(client, tmp_path):
    """An http(s) image gives the same answer as the same bytes inline."""
    import functools
    import http.server
    import threading

    (tmp_path / "cat.png").write_bytes(png_bytes(IMAGES[0]))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer((IMAGE_HOST, 0), handler)  # the address the stack may fetch from
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        answers = []
        for url in (f"http://{IMAGE_HOST}:{server.server_port}/cat.png", data_url(IMAGES[0])):
            r = client.chat.completions.create(
                model=MODEL, max_tokens=8, temperature=0, extra_body={"max_num": 2, "return_token_ids": True},
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
            answers.append(r.choices[0].token_ids)
        assert answers[0] == answers[1]
    finally:
        server.shutdown()


def test_image_urls_cannot_reach_inside(client):
    """Loopback (however spelled), and Redis or a pool's port behind it, are never connected to."""
    from tests.test_media import Listener

    listener = Listener()
    try:
        for host in ("127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]"):
            with pytest.raises(openai.BadRequestError, match="does not fetch from|invalid image URL"):
                client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"http://{host}:{listener.port}/x.png"}}]}])
        assert listener.connections == 0
    finally:
        listener.close()


def test_client_disconnect_cancels_the_generation(stack):
    """A dropped SSE stream reaches the decoder: its running count returns to zero."""
    import time

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Talk for a long time."}], "stream": True,
            "max_tokens": 5000}
    with httpx.stream("POST", stack.gateway_url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert metric(stack.decoder_metrics_url, "decoder_running_requests") == 1
    deadline = time.monotonic() + 10
    while metric(stack.decoder_metrics_url, "decoder_running_requests") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(stack.decoder_metrics_url, "decoder_running_requests") == 0


@pytest.mark.parametrize("addr,method,streams", [("gateway_grpc", "Gateway/Chat", False),
                                                  ("gateway_grpc", "Gateway/ChatStream", True),
                                                  ("vision_addr", "VisionEncoder/Encode", False),
                                                  ("decoder_addr", "LlmDecoder/Generate", True)])
def test_bytes_that_are_no_request_message_are_invalid_argument(stack, client, addr, method, streams):
    """Bytes that do not parse (a truncated varint; a string field that is not UTF-8) are the client's error, as any
    bad input: INVALID_ARGUMENT, not grpcio's UNKNOWN; the server keeps serving."""
    with grpc.insecure_channel(getattr(stack, addr)) as channel:
        call = (channel.unary_stream if streams else channel.unary_unary)(f"/internvl.serving.v1.{method}")
        for data in (b"\xff\xff\xff\xff\x0f", b"\x0a\x02\xff\xfe"):
            with pytest.raises(grpc.RpcError) as e:
                list(call(data, timeout=10)) if streams else call(data, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in e.value.details()
    answer = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("addr", ["gateway_grpc", "vision_addr", "decoder_addr"])
def test_every_server_has_health_and_reflection(stack, addr):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(getattr(stack, addr)) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = {s.name for a in answers for s in a.list_services_response.service}
    assert "grpc.health.v1.Health" in services and any(s.startswith("internvl.serving.v1.") for s in services)


def test_a_prompt_too_long_for_the_context_is_refused_before_encoding(stack):
    """Five 13-tile images are 16,640 image tokens: over the tiny model's 16,384; the vision pool is not asked."""
    before = metric(stack.vision_metrics_url, "vision_images_encoded_total")
    image = {"type": "image_url", "image_url": {"url": data_url(noise_image(800, 600, seed=30))}}
    r = httpx.post(stack.gateway_url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "max_num": 12, "messages": [{"role": "user", "content": [image] * 5}]})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert metric(stack.vision_metrics_url, "vision_images_encoded_total") == before


def test_a_non_streamed_client_that_leaves_cancels_the_generation(stack):
    """The client closes its connection while the answer is generated: the decoder ends it as "cancelled".

    The tiny random model can hit its stop token early (greedy paths differ with fp32 rounding from run to run), so a
    generation that ended by itself before the client left proves nothing: then another prompt is tried.
    """
    import socket
    import time
    from urllib.parse import urlparse

    def ended(reason):
        return metric(stack.decoder_metrics_url, "decoder_requests_total", finish_reason=reason)

    def wait_for(condition, what):
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    url = urlparse(stack.gateway_url)
    for attempt in range(5):
        before = {reason: ended(reason) for reason in ("cancelled", "stop", "length")}
        body = json.dumps({"model": MODEL, "max_tokens": 16000, "messages": [
            {"role": "user", "content": f"Attempt {attempt}: talk for a long time."}]}).encode()
        with socket.create_connection((url.hostname, url.port)) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: any(ended(r) > before[r] for r in before) or
                     metric(stack.decoder_metrics_url, "decoder_running_requests") == 1, "the generation started")
        wait_for(lambda: any(ended(r) > before[r] for r in before), "the generation ended")
        if ended("cancelled") > before["cancelled"]:
            break
    assert ended("cancelled") == before["cancelled"] + 1, "every attempt stopped by itself before the client left"
    assert metric(stack.decoder_metrics_url, "decoder_running_requests") == 0


def test_a_streamed_client_that_leaves_during_the_prefill_cancels_it(stack):
    """A 12k-token prompt's prefill takes seconds on the CPU: a streaming client that leaves before its first token
    ends the generation then (no token is generated), not once the first token is there to be written; the request
    is counted as 499, the client's doing, not the server's."""
    import socket
    import time
    from urllib.parse import urlparse

    def counts():
        return (metric(stack.decoder_metrics_url, "decoder_requests_total", finish_reason="cancelled"),
                metric(stack.decoder_metrics_url, "decoder_generated_tokens_total"),
                metric(stack.gateway_url + "/metrics", "gateway_requests_total", api="rest", status="499"))

    before = counts()
    body = json.dumps({"model": MODEL, "max_tokens": 1, "stream": True, "messages": [
        {"role": "user", "content": "Tell me everything about the tiles, one by one. " * 600}]}).encode()
    url = urlparse(stack.gateway_url)
    with socket.create_connection((url.hostname, url.port)) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while metric(stack.decoder_metrics_url, "decoder_running_requests") != 1:
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.02)
    deadline = time.monotonic() + 20
    while counts()[0] == before[0]:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    assert [after - b for after, b in zip(counts(), before)] == [1, 0, 1]


def test_an_idle_connection_outlives_the_clients_keep_alive(stack):
    """httpx (so the openai client) keeps an idle connection 5 s: the gateway keeps it open longer, so a client never
    sends a request on a connection the server is just closing (uvicorn's own 5 s raced httpx's: a ReadError)."""
    import http.client
    import time
    from urllib.parse import urlparse

    url = urlparse(stack.gateway_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        for idle in (0, 5.5):  # one connection (http.client does not reconnect: a closed one raises)
            time.sleep(idle)
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, b'{"status":"ok"}')
    finally:
        connection.close()


def test_a_client_that_leaves_during_its_upload_is_counted_as_499(stack):
    """A request body cut short by the client is the client's doing: 499, not a server error."""
    import socket
    import time
    from urllib.parse import urlparse

    def count(status):
        return metric(stack.gateway_url + "/metrics", "gateway_requests_total", api="rest", status=status)

    before = count("499"), count("500")
    url = urlparse(stack.gateway_url)
    with socket.create_connection((url.hostname, url.port)) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 1000\r\n\r\n{\"model\":")
    deadline = time.monotonic() + 10
    while count("499") == before[0]:
        assert time.monotonic() < deadline, "the request was not counted"
        time.sleep(0.02)
    assert (count("499"), count("500")) == (before[0] + 1, before[1])


def samples(url: str) -> dict[str, list]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_pools_export_their_scaling_and_latency_series(client, stack):
    """vLLM's series on the decoder (what KEDA recipes and routers read); queue, utilization and latency on the
    vision pool."""
    ttft_before = sum(s.value for s in samples(stack.decoder_metrics_url).get("vllm:time_to_first_token_seconds_count", []))
    encode_before = metric(stack.vision_metrics_url, "vision_encode_seconds_count")
    encode_s, busy_s = (metric(stack.vision_metrics_url, n) for n in ("vision_encode_seconds_sum",
                                                                       "vision_busy_seconds_total"))
    client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(noise_image(123, 321, seed=99))}}]}])
    decoder = samples(stack.decoder_metrics_url)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert [s.labels for s in decoder[name]] == [{"model_name": decoder[name][0].labels["model_name"]}], name
    assert 0 <= decoder["vllm:kv_cache_usage_perc"][0].value <= 1
    ttft = [s for s in decoder["vllm:time_to_first_token_seconds_count"]]
    assert sum(s.value for s in ttft) >= ttft_before + 1
    assert sum(s.value for s in decoder["vllm:time_per_output_token_seconds_count"]) >= 5
    vision = samples(stack.vision_metrics_url)
    for name in ("vision_requests_waiting", "vision_requests_running", "vision_queued_tiles"):
        assert vision[name][0].value == 0, name  # nothing in flight now
    assert 0 < vision["vision_utilization"][0].value <= 1
    assert vision["vision_encode_seconds_count"][0].value == encode_before + 1
    busy = vision["vision_busy_seconds_total"][0].value - busy_s
    assert busy > 0 and vision["vision_encode_seconds_sum"][0].value - encode_s >= busy  # the call holds the forward


def test_the_gateway_counts_requests_by_outcome(stack, client, gateway):
    url = stack.gateway_url + "/metrics"
    outcomes = [("rest", "200"), ("rest", "400"), ("grpc", "OK"), ("grpc", "INVALID_ARGUMENT")]
    before = [metric(url, "gateway_requests_total", api=a, status=s) for a, s in outcomes]
    client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert httpx.post(stack.gateway_url + "/v1/chat/completions", json={"model": MODEL, "messages": []}).status_code \
        == 400
    gateway.Chat(pb.ChatRequest(model=MODEL, max_tokens=2, messages=to_grpc([{"role": "user", "content": "hi"}])))
    with pytest.raises(grpc.RpcError):
        gateway.Chat(pb.ChatRequest(model=MODEL, messages=[]))
    after = [metric(url, "gateway_requests_total", api=a, status=s) for a, s in outcomes]
    assert after == [b + 1 for b in before]
    assert metric(url, "gateway_requests_in_flight", api="rest") == 0
    assert metric(url, "gateway_time_to_first_token_seconds_count", api="grpc") >= 1
    assert metric(url, "gateway_request_seconds_sum", api="rest") >= metric(
        url, "gateway_time_to_first_token_seconds_sum", api="rest") > 0


def test_one_request_id_through_the_three_services(stack):
    """The client's X-Request-Id comes back and names the request in every service's log line."""
    rid = f"trace-{uuid.uuid4().hex[:12]}"
    r = httpx.post(stack.gateway_url + "/v1/chat/completions", headers={"X-Request-Id": rid}, timeout=60, json={
        "model": MODEL, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(noise_image(99, 77, seed=4242))}}]}]})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    assert len(httpx.post(stack.gateway_url + "/v1/chat/completions", headers={"X-Request-Id": "bad id!"}, json={
        "model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).headers["x-request-id"]) == 32
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in stack.log_path.read_text().splitlines() if f"request_id={rid}" in line]
        names = {line.split(": ", 1)[0].split()[-1] for line in lines}
        if {"gateway.access", "llm_decoder", "vision_encoder"} <= names or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {"gateway.access", "llm_decoder", "vision_encoder"} <= names, lines
    access = next(line for line in lines if "gateway.access" in line)
    assert "status=200" in access and "completion_tokens=3" in access and "ttft_s=" in access


def test_server_timing_splits_the_time_to_first_token(stack):
    """Where a request's time before its first token went, in its Server-Timing header (streamed or not) and its
    access line: fetching, preprocessing and looking up images, the prompt, the vision pool (and of that, its write
    of the embeddings to Redis), the decoder (and of that, its read of them). A cache hit has no write, and its read
    is the decoder's recent images (a look-up, which may round to 0.0 ms); the phases add up to less than the whole
    answer took, and in the access line (REST and gRPC) to no more than its time to
    first token."""
    ids = []
    for stream in (False, True):
        image = {"type": "image_url", "image_url": {"url": data_url(noise_image(240, 160, seed=7070 + stream))}}
        body = {"model": MODEL, "max_tokens": 2, "stream": stream, "messages": [{"role": "user", "content": [image]}]}
        for hit in (False, True):
            start = time.perf_counter()
            r = httpx.post(stack.gateway_url + "/v1/chat/completions", json=body, timeout=60)
            answer_ms = 1e3 * (time.perf_counter() - start)
            assert r.status_code == 200
            phases = {k: float(v) for k, v in (part.split(";dur=") for part in r.headers["server-timing"].split(", "))}
            assert set(phases) == {"prompt", "fetch", "preprocess", "cache", "vision", "decoder", "read"} | \
                (set() if hit else {"store"}), (stream, hit, phases)
            assert all(ms >= 0 for ms in phases.values()) and sum(phases.values()) < answer_ms
            assert hit or (phases["read"] > 0 and phases["store"] > 0)
            ids.append(r.headers["x-request-id"])
    image = pb.ContentPart(image_bytes=png_bytes(noise_image(240, 160, seed=7072)))
    chat = pb.ChatRequest(model=MODEL, max_tokens=2, messages=[pb.ChatMessage(role="user", content=[image])])
    with grpc.insecure_channel(stack.gateway_grpc) as channel:
        list(pb_grpc.GatewayStub(channel).ChatStream(chat, metadata=[("x-request-id", "timing-grpc")]))
    ids.append("timing-grpc")
    for rid in ids:  # each access line: its phases, which add up to no more than its time to first token
        deadline = time.monotonic() + 10  # the access line of a stream is written once its last event has gone
        while not (access := [line for line in stack.log_path.read_text().splitlines()
                              if "gateway.access" in line and f"request_id={rid}" in line]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        fields = dict(re.findall(r"(\w+)=(\S+)", access[0]))
        phases = {k: float(v) for k, v in fields.items() if k.endswith("_s") and k not in ("ttft_s", "duration_s")}
        assert {"fetch_s", "vision_s", "decoder_s", "read_s"} <= set(phases), access[0]
        assert float(fields["ttft_s"]) >= sum(phases.values()) - 0.0005, access[0]
