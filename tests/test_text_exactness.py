"""Text in and out exactly as the checkpoint's tokenizer has it, for every tokenizer kind the tiny tool writes.

Prompt ids: what the gateway sends equals the checkpoint's tokenizer applied to the whole expanded prompt.
Streamed text: the deltas plus the final flush equal the decode of all ids with the control tokens skipped and the
grounding tokens (<ref>, <box>, <quad>) kept, and no delta is ever taken back (each one extends a prefix of the final
text), also for random ids with invalid UTF-8 byte runs.
"""
import random

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.checkpoint import read_model_config
from services.common.tokenizer import load_tokenizer
from services.gateway.errors import ApiError
from services.gateway.prompt import PromptBuilder
from services.gateway.schema import Message
from services.llm_decoder.detokenizer import GROUNDING_TOKENS, TextDecoder
from tools.make_tiny_checkpoint import write_tiny_checkpoint

# (family, layout, tokenizer kind): byte-level BPE; the sentencepiece rebuild; Metaspace tokenizer.json, both schemes.
KINDS = [("internvl2_5", "native", "sentencepiece"), ("internvl2", "original", "sentencepiece"),
         ("internvl2", "native", "sentencepiece"), ("internvl2", "native", "metaspace-first"),
         ("internvl2", "original", "metaspace-first"), ("internvl2", "native", "metaspace-always"),
         ("internvl2_5-internlm2", "original", "metaspace-always")]
IDS = ["-".join(k) for k in KINDS]


@pytest.fixture(scope="module", params=KINDS, ids=IDS)
def checkpoint(request, tmp_path_factory):
    family, layout, kind = request.param
    return write_tiny_checkpoint(tmp_path_factory.mktemp("-".join(request.param)) / "ckpt", family=family,
                                 layout=layout, tokenizer=kind)


IMAGE = {"type": "image_url", "image_url": {"url": "x"}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


CONVERSATIONS = {  # each with the images' tile counts
    "image first": ([Message(role="user", content=[IMAGE, text("What is it?")])], [1]),
    "image last": ([Message(role="user", content=[text("Look at this"), IMAGE])], [2]),
    "image in the middle, several images, turns, system": ([
        Message(role="system", content="Be brief."),
        Message(role="user", content=[IMAGE, text(" Compare it with"), IMAGE, text("\n and 你好 .")]),
        Message(role="assistant", content="Two  cats."),
        Message(role="user", content=[text("And"), IMAGE, IMAGE, text(" ok")])], [2, 1, 3, 1]),
    "images only": ([Message(role="user", content=[IMAGE, IMAGE])], [1, 1]),
    "text only": ([Message(role="user", content=" leading space, 😀 and\ttabs ")], []),
    "image placeholders": ([Message(role="user", content=[text("Image-1: <image>\nImage-2:<image> Q"), IMAGE,
                                                          IMAGE])], [1, 2]),
    "grounding": ([Message(role="user", content="Where is <ref>the dog</ref>? And <quad>x</quad>"),
                   Message(role="assistant", content="<ref>the dog</ref><box>[[10, 20, 300, 400]]</box>"),
                   Message(role="user", content=[IMAGE, text("<ref>a cat</ref>")])], [1]),
    "video": ([Message(role="user", content=[{"type": "video_url", "video_url": {"url": "v", "num_segments": 2}},
                                             text("What happens?")])], [1, 1]),
}


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_prompt_ids_equal_the_tokenizer_on_the_whole_expanded_prompt(checkpoint, conversation):
    builder = PromptBuilder(checkpoint, read_model_config(checkpoint))
    messages, tiles = CONVERSATIONS[conversation]
    rendered, _ = builder.render(messages)
    assert builder.expand(rendered, tiles) == load_tokenizer(checkpoint)(expanded(rendered, tiles))["input_ids"]


def expanded(rendered: str, tiles: list[int]) -> str:
    """The rendered prompt with each image's context tokens written out, as one string."""
    pieces = rendered.split("<IMG_CONTEXT>")
    return pieces[0] + "".join(f"<img>{'<IMG_CONTEXT>' * 256 * n}</img>{piece}" for n, piece in zip(tiles, pieces[1:]))


# Pieces of random message text: spaces and newlines next to images, non-ASCII, markup, and the tokenizers' own
# word-boundary mark, special tokens and image placeholder spelled out.
PIECES = [" ", "  ", "\n", "\t", "a", "Hello", "你好", "😀", "<", ">", "<ref>", "</ref>", "<box>", "<image>", "1", ".",
          "\u00a0", "é", "▁", "<|im_end|>", "<s>", "</s>"]


def random_conversation(rng: random.Random) -> list[Message]:
    def text() -> str:
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8)))

    messages = [Message(role="system", content=text())] if rng.random() < 0.4 else []
    for role in ["user", "assistant"] * rng.randint(1, 3):
        parts = [IMAGE if rng.random() < 0.3 else {"type": "text", "text": text()} for _ in range(rng.randint(1, 4))]
        messages.append(Message(role=role, content=parts if rng.random() < 0.8 else text()))
    return messages[:-1]  # the user's turn last


def test_random_conversations_expand_as_the_tokenizer_reads_them(checkpoint):
    builder, tokenizer = PromptBuilder(checkpoint, read_model_config(checkpoint)), load_tokenizer(checkpoint)
    checked = 0
    for seed in range(60):
        rng = random.Random(seed)
        try:
            rendered, media = builder.render(random_conversation(rng))
        except ApiError:  # `<image>` typed more or fewer times than the message has images: refused, fine
            continue
        tiles = [rng.randint(1, 3) for _ in media]
        assert builder.expand(rendered, tiles) == tokenizer(expanded(rendered, tiles))["input_ids"], seed
        checked += 1
    assert checked >= 30, checked


def check_stream(decoder: TextDecoder, ids: list[int], context: list[int] = ()) -> None:
    full = decoder.decode(ids, context)
    detok, streamed = decoder.stream(context), ""
    for token in ids:
        streamed += detok.step(token)
        assert full.startswith(streamed)  # what was sent is final
    assert streamed + detok.finish() == full


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """Tokenizers with byte fallback (sentencepiece rebuild, Metaspace tokenizer.json) and byte-level BPE."""
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for family, layout, kind in [("internvl2", "original", "sentencepiece"), ("internvl2", "native", "metaspace-first"),
                                 ("internvl2_5", "native", "sentencepiece")]:
        path = write_tiny_checkpoint(root / f"{family}-{layout}-{kind}", family=family, layout=layout, tokenizer=kind)
        out[kind if family == "internvl2" else "byte-level"] = TextDecoder(load_tokenizer(path).backend_tokenizer)
    return out


def test_byte_fallback_vocabularies_are_recognised(decoders):
    assert len(decoders["sentencepiece"].byte_pieces) == 256 == len(decoders["metaspace-first"].byte_pieces)
    assert not decoders["byte-level"].byte_pieces and decoders["byte-level"].special


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.parametrize("kind", ["sentencepiece", "metaspace-first", "byte-level"])
def test_deltas_add_up_to_the_full_decode(decoders, kind, data):
    decoder = decoders[kind]
    vocab = decoder.tokenizer.get_vocab_size()
    pieces = sorted(decoder.byte_pieces)
    token = st.one_of(  # byte pieces often (runs of valid and invalid UTF-8), any token, special tokens
        st.sampled_from(pieces) if pieces else st.integers(0, vocab - 1),
        st.integers(0, vocab - 1), st.sampled_from(sorted(decoder.special) + grounding_ids(decoder)))
    check_stream(decoder, data.draw(st.lists(token, max_size=40)))
    # An answer continuing the prompt's text: decoded after the prompt's last token, whatever that is.
    prompt = data.draw(st.lists(token, min_size=1, max_size=3))
    ids = data.draw(st.lists(token, max_size=20))
    check_stream(decoder, ids, decoder.context(prompt))


@pytest.mark.parametrize("kind", ["sentencepiece", "metaspace-first", "byte-level"])
def test_a_continued_message_reads_on_from_the_prompt(decoders, kind):
    """A prefilled message and its continuation read as the whole message: the continuation's first word keeps its
    space (sentencepiece decoders drop a first token's), and so do its log-probabilities' bytes."""
    decoder = decoders[kind]
    encode = lambda text: decoder.tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    for prefill, more in (("Once upon a", " time there was"), ("Say:", " 你好 😀 and"), ("x", "y z"), ("a\n", " b")):
        whole = encode(prefill + more)
        for cut in range(1, len(whole)):
            prompt, answer = whole[:cut], whole[cut:]
            context = decoder.context(prompt)
            # A prompt's text ends with a whole character (its tokens may not: byte pieces give no context)
            if not set(prompt[-1:]) & decoder.byte_pieces and not decoder.decode(prompt).endswith("\ufffd"):
                assert decoder.decode(prompt) + decoder.decode(answer, context) == decoder.decode(whole)
                first = not context
                assert b"".join(decoder.token_bytes(t, first=first and k == 0) for k, t in enumerate(answer)) == \
                    decoder.decode(answer, context).encode()
            check_stream(decoder, answer, context)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.parametrize("kind", ["sentencepiece", "metaspace-first", "byte-level"])
def test_token_bytes_join_to_the_text(decoders, kind, data):
    """OpenAI's log-probability `bytes`: joined, the tokens' bytes are the text's UTF-8, where a character is split
    over byte-level pieces or byte-fallback pieces, and with sentencepiece's spaces (the first token's dropped)."""
    decoder = decoders[kind]
    text = data.draw(st.text(st.characters(codec="utf-8"), max_size=30) | st.sampled_from(["  a", " 你好 😀", "\ud55c"]))
    ids = decoder.tokenizer.encode(text, add_special_tokens=False).ids
    for token in data.draw(st.lists(st.sampled_from(sorted(decoder.special)), max_size=2)):  # skipped anywhere
        ids.insert(data.draw(st.integers(0, len(ids))), token)
    ids = data.draw(st.sampled_from([[], grounding_ids(decoder)[:1]])) + ids  # markup kept, first or not
    assert joined_bytes(decoder, ids) == decoder.decode(ids).encode()
    # any ids: byte-level decodes invalid bytes as Python does; a byte-fallback run gives one U+FFFD per byte
    ids = data.draw(st.lists(st.integers(0, decoder.tokenizer.get_vocab_size() - 1), max_size=20))
    raw = joined_bytes(decoder, ids)
    if decoder.byte_level or is_utf8(raw):
        assert raw.decode(errors="replace") == decoder.decode(ids)


def joined_bytes(decoder: TextDecoder, ids: list[int]) -> bytes:
    text = [i for i in ids if i not in decoder.special]
    return b"".join(decoder.token_bytes(t, first=k == 0) for k, t in enumerate(text))


def is_utf8(raw: bytes) -> bool:
    try:
        return raw.decode() is not None
    except UnicodeDecodeError:
        return False


def grounding_ids(decoder: TextDecoder) -> list[int]:
    return sorted(decoder.tokenizer.token_to_id(t) for t in GROUNDING_TOKENS)


@pytest.mark.parametrize("kind", ["sentencepiece", "metaspace-first", "byte-level"])
def test_grounding_tokens_stay_in_the_text_and_control_tokens_go(decoders, kind):
    """The tokenizers flag <ref>, <box>, <quad> special (as InternVL's do), yet an answer's text keeps them."""
    decoder = decoders[kind]
    tokenizer = decoder.tokenizer
    added = {t.content: t.special for t in tokenizer.get_added_tokens_decoder().values()}
    assert all(added[t] for t in GROUNDING_TOKENS) and added["<|im_end|>"] and added["<IMG_CONTEXT>"]
    answer = "<ref>the dog</ref><box>[[10, 20, 300, 400]]</box> and <quad>a</quad>"
    ids = tokenizer.encode(answer, add_special_tokens=False).ids
    control = [tokenizer.token_to_id(t) for t in ("<|im_end|>", "<IMG_CONTEXT>", "<img>")]
    text = decoder.decode(ids + control)
    assert text == tokenizer.decode(ids, skip_special_tokens=False)
    assert "<ref>" in text and "<box>" in text and "</quad>" in text and "<|im_end|>" not in text
    check_stream(decoder, ids + control)
    # what the skip_special_tokens decode would have made of it: the markup gone
    assert "<ref>" not in tokenizer.decode(ids, skip_special_tokens=True)


def test_known_hard_cases(decoders):
    sp = decoders["sentencepiece"]
    byte = {int(t[3:5], 16): i for t, i in sp.tokenizer.get_vocab().items() if len(t) == 6 and t.startswith("<0x")}
    word = sp.tokenizer.token_to_id("▁the")
    e_acute, zhong = [byte[0xC3], byte[0xA9]], [byte[0xE4], byte[0xB8], byte[0xAD]]
    for ids in ([word, *e_acute, byte[0x80], word],  # a valid character undone by the invalid byte after it
                [word, *zhong[:2], word, *zhong],  # a character cut by a word, then whole
                [*zhong, *e_acute, word], [byte[0xFF]], [word, 1, word, 2, *zhong]):  # specials (<s>, </s>) inside
        check_stream(sp, ids)
    assert sp.decode([word, *e_acute, byte[0x80]]).endswith("\ufffd" * 3)  # the case a window decoder got wrong


@pytest.fixture(scope="module")
def byte_fallback_stack(tmp_path_factory, redis_url):
    from tools.run_local import start_stack
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("bf") / "ckpt", family="internvl2", layout="native",
                                 tokenizer="metaspace-first")
    with open(path.parent / "stack.log", "w") as log:
        stack = start_stack(str(path), redis_url=redis_url, log=log, extra_env={"CACHE_NAMESPACE": "bf"})
        yield stack, TextDecoder(load_tokenizer(path).backend_tokenizer)
        stack.stop()


def test_services_return_exactly_the_decoded_text(byte_fallback_stack):
    """Sampled answers of a random model are full of byte pieces: SSE and non-streamed text equal decode(ids)."""
    stack, decoder = byte_fallback_stack
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)
    checked = 0
    for seed in range(6):
        kwargs = dict(model="ckpt", max_tokens=40, temperature=1.0, seed=seed,
                      messages=[{"role": "user", "content": f"Say something {seed}"}])
        r = client.chat.completions.create(extra_body={"return_token_ids": True}, logprobs=True, **kwargs)
        ids = r.choices[0].token_ids
        assert r.choices[0].message.content == decoder.decode(ids)
        entries = r.choices[0].logprobs.content  # a control token's bytes spell it, though the text skips it
        assert len(entries) == len(ids)
        raw = b"".join(bytes(e.bytes) for e, t in zip(entries, ids) if t not in decoder.special)
        assert raw == joined_bytes(decoder, ids) and (not is_utf8(raw) or raw.decode() == r.choices[0].message.content)
        stream = client.chat.completions.create(stream=True, **kwargs)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == decoder.decode(ids)
        checked += any(i in decoder.byte_pieces for i in ids)
    assert checked  # the answers did exercise byte fallback
    assert httpx.get(stack.gateway_url + "/health").status_code == 200


def test_a_continued_message_keeps_its_next_words_space(byte_fallback_stack):
    """continue_final_message with a sentencepiece tokenizer: the answer's first word ("▁the", forced) reads " the"
    after "Once upon a", streamed or not, and its log-probability bytes say so too (decoded alone it reads "the")."""
    stack, decoder = byte_fallback_stack
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)
    the = decoder.tokenizer.token_to_id("▁the")
    kwargs = dict(model="ckpt", max_tokens=4, temperature=1.0, seed=1, logit_bias={str(the): 100},
                  messages=[{"role": "user", "content": "Tell a story."},
                            {"role": "assistant", "content": "Once upon a"}],
                  extra_body={"continue_final_message": True, "add_generation_prompt": False})
    r = client.chat.completions.create(logprobs=True, **kwargs)
    text = r.choices[0].message.content
    assert text == " the the the the" and decoder.decode([the] * 4) == "the the the the"
    assert b"".join(bytes(e.bytes) for e in r.choices[0].logprobs.content) == text.encode()
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                   if c.choices) == text
