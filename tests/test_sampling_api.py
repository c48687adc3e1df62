"""The sampling API through the whole stack, REST and gRPC: stop strings, n choices, log-probabilities, and the
request fields the gateway refuses or accepts."""
import grpc
import httpx
import pytest
import torch

from internvl.serving.v1 import serving_pb2 as pb
from tests.test_end_to_end import MODEL, to_grpc

ASK = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def complete(client, messages=ASK, **options):
    extra = {"return_token_ids": True, "ignore_eos": True, **options.pop("extra", {})}
    return client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra, **options)


def stream(client, messages=ASK, **options):
    chunks = list(complete(client, messages, stream=True, stream_options={"include_usage": True}, **options))
    texts, finishes = {}, {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                assert choice.index not in finishes  # one finish per choice, on its last chunk
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, chunks[-1].usage


@pytest.fixture(scope="module")
def free_run(client, reference):
    """A greedy answer that no end of turn cuts short, with the text of each prefix of its tokens."""
    ids = complete(client, max_tokens=32, temperature=0).choices[0].token_ids
    texts = [reference.text(ids[:k]) for k in range(len(ids) + 1)]
    return ids, texts


def stop_case(free_run, start_token):
    """A stop string over the boundary between two tokens (2 characters each side), from token `start_token` on: the
    stop string, the answer before it, and the tokens that make it appear."""
    ids, texts = free_run
    full = texts[-1]
    for k in range(start_token, len(ids)):
        cut = len(texts[k])
        stop = full[cut - 2:cut + 2]
        if cut >= 2 and len(stop) == 4 and full.find(stop) == cut - 2 and \
                all(full.startswith(t) for t in texts[k:k + 3]):
            used = next(j for j in range(k + 1, len(ids) + 1) if stop in texts[j])
            if full.startswith(texts[used]):
                return stop, full[:cut - 2], used
    pytest.fail(f"no token boundary to put a stop string over in {full!r}")


def test_a_stop_string_split_over_tokens_ends_the_answer(client, gateway, free_run):
    stop, answer, used = stop_case(free_run, 2)
    ids = free_run[0]
    r = complete(client, max_tokens=32, temperature=0, stop=[stop, "never appears \u2603"])
    choice = r.choices[0]
    assert (choice.message.content, choice.finish_reason) == (answer, "stop")
    assert choice.token_ids == ids[:used] and r.usage.completion_tokens == used
    texts, finishes, usage = stream(client, max_tokens=32, temperature=0, stop=stop)
    assert texts == {0: answer} and finishes == {0: "stop"} and usage.completion_tokens == used
    request = pb.ChatRequest(model=MODEL, messages=to_grpc(ASK), max_tokens=32, temperature=0, ignore_eos=True,
                             stop=[stop])
    whole = gateway.Chat(request, timeout=60)
    assert (whole.text, whole.finish_reason, list(whole.token_ids)) == (answer, "stop", ids[:used])
    parts = list(gateway.ChatStream(request, timeout=60))
    assert "".join(p.text for p in parts) == answer and parts[-1].finish_reason == "stop"
    assert parts[-1].usage.completion_tokens == used
    # include_stop_str_in_output (as vLLM): the same tokens, and the stop string ends the text
    kept = complete(client, max_tokens=32, temperature=0, stop=stop, extra={"include_stop_str_in_output": True})
    assert (kept.choices[0].message.content, kept.choices[0].token_ids) == (answer + stop, ids[:used])
    assert stream(client, max_tokens=32, temperature=0, stop=stop, extra={"include_stop_str_in_output": True})[:2] \
        == ({0: answer + stop}, {0: "stop"})
    request.include_stop_str_in_output = True
    assert gateway.Chat(request, timeout=60).text == answer + stop


def test_a_stop_string_in_the_first_token(client, free_run):
    ids, texts = free_run
    assert texts[1], "the first token has no text of its own"
    r = complete(client, max_tokens=32, temperature=0, stop=texts[1][:1])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("", "stop")
    assert r.choices[0].token_ids == ids[:1] and r.usage.completion_tokens == 1
    assert stream(client, max_tokens=32, temperature=0, stop=texts[1][:1])[:2] == ({0: ""}, {0: "stop"})


def test_n_seeded_choices_are_reproducible_and_differ(client, gateway):
    options = dict(max_tokens=12, temperature=1.0, seed=42, n=3)
    first, again = complete(client, **options), complete(client, **options)
    answers = [c.token_ids for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.token_ids for c in again.choices] == answers and len({tuple(a) for a in answers}) == 3
    assert first.usage.completion_tokens == sum(len(a) for a in answers)
    assert complete(client, max_tokens=12, temperature=1.0, seed=42).choices[0].token_ids == answers[0]
    texts, finishes, usage = stream(client, **options)
    assert texts == {c.index: c.message.content for c in first.choices} and set(finishes) == {0, 1, 2}
    assert usage.completion_tokens == first.usage.completion_tokens
    request = pb.ChatRequest(model=MODEL, messages=to_grpc(ASK), max_tokens=12, temperature=1.0, seed=42, n=3,
                             ignore_eos=True)
    whole = gateway.Chat(request, timeout=60)
    assert [list(c.token_ids) for c in whole.choices] == answers and [c.index for c in whole.choices] == [0, 1, 2]
    assert list(whole.token_ids) == answers[0] and whole.usage.completion_tokens == first.usage.completion_tokens
    streamed = {}
    for part in gateway.ChatStream(request, timeout=60):
        streamed.setdefault(part.index, []).extend(part.token_ids)
    assert [streamed[i] for i in range(3)] == answers


def test_logprobs_equal_the_reference_log_softmax(client, gateway, reference):
    """Greedy: every token's log-probability and top 5 are log_softmax of transformers' logits for the same ids."""
    r = complete(client, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    out = r.choices[0].token_ids
    content = r.choices[0].logprobs.content
    text = reference.tokenizer.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True)
    prompt = reference.tokenizer(text).input_ids
    assert len(prompt) == r.usage.prompt_tokens and len(content) == len(out) == 8
    with torch.no_grad():
        logits = reference.model(input_ids=torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1:]
    want = logits.float().log_softmax(-1)
    for k, (token, entry) in enumerate(zip(out, content)):
        assert entry.logprob == pytest.approx(want[k, token].item(), abs=1e-4)
        assert entry.token == reference.tokenizer.decode([token])
        top = want[k].topk(5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [reference.tokenizer.decode([i]) for i in top.indices]
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy took the most likely token
    # OpenAI's `bytes`: joined, the tokens' bytes are the answer's text, characters split over tokens included
    assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == r.choices[0].message.content
    chunks = list(complete(client, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5, stream=True))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    assert complete(client, max_tokens=2, temperature=0).choices[0].logprobs is None
    plain = complete(client, max_tokens=3, temperature=0, logprobs=True).choices[0].logprobs.content
    assert len(plain) == 3 and all(e.top_logprobs == [] for e in plain)
    whole = gateway.Chat(pb.ChatRequest(model=MODEL, messages=to_grpc(ASK), max_tokens=8, temperature=0,
                                        ignore_eos=True, logprobs=True, top_logprobs=5), timeout=60)
    assert [e.chosen.token_id for e in whole.logprobs] == out
    assert [e.chosen.logprob for e in whole.logprobs] == pytest.approx([e.logprob for e in content], abs=1e-6)
    assert all(len(e.top) == 5 for e in whole.logprobs)


def test_grounding_tokens_the_model_emits_are_in_the_text(client, gateway, reference):
    """Sampled with the grounding tokens as stop tokens, answers end at one: its markup ends the text (they are
    special tokens in the tokenizer, yet not skipped like the end of turn), streamed or not, REST and gRPC."""
    grounding = {reference.tokenizer.convert_tokens_to_ids(t): t for t in ("<ref>", "</ref>", "<box>", "</box>",
                                                                           "<quad>", "</quad>")}
    options = dict(max_tokens=400, temperature=2.0, seed=3, n=8, extra={"stop_token_ids": sorted(grounding)})
    r = complete(client, **options)
    ended = [c for c in r.choices if c.finish_reason == "stop"]
    assert ended, "no answer reached a grounding token"
    for c in ended:
        assert c.token_ids[-1] in grounding and c.message.content.endswith(grounding[c.token_ids[-1]])
        assert c.message.content == reference.text(c.token_ids)
    texts, finishes, _ = stream(client, **options)
    assert texts == {c.index: c.message.content for c in r.choices}
    whole = gateway.Chat(pb.ChatRequest(model=MODEL, messages=to_grpc(ASK), max_tokens=400, temperature=2.0, seed=3,
                                        n=8, ignore_eos=True, stop_token_ids=sorted(grounding)), timeout=120)
    assert [c.text for c in whole.choices] == [c.message.content for c in r.choices]


def test_logit_bias_forces_and_bans_tokens(client, gateway, free_run, reference):
    """+100 makes a token every greedy choice; -100 bans the greedy answer's first token, so the answer changes there;
    REST (the official client's string keys) and gRPC (a map) alike; log-probabilities stay the model's own."""
    ids, _ = free_run
    forced = complete(client, max_tokens=4, temperature=0, logit_bias={str(ids[5]): 100}, logprobs=True)
    assert forced.choices[0].token_ids == [ids[5]] * 4
    prompt = reference.tokenizer(reference.tokenizer.apply_chat_template(ASK, tokenize=False,
                                                                         add_generation_prompt=True)).input_ids
    with torch.no_grad():
        raw = reference.model(input_ids=torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)[ids[5]].item()
    assert forced.choices[0].logprobs.content[0].logprob == pytest.approx(raw, abs=1e-4)
    banned = complete(client, max_tokens=4, temperature=0, logit_bias={str(ids[0]): -100}).choices[0].token_ids
    assert banned[0] != ids[0]
    answer = gateway.Chat(pb.ChatRequest(model=MODEL, messages=to_grpc(ASK), max_tokens=4, temperature=0,
                                         ignore_eos=True, logit_bias={ids[5]: 100.0}), timeout=30)
    assert list(answer.token_ids) == [ids[5]] * 4


def test_min_tokens_holds_off_stop_tokens_and_stop_strings(client, gateway, free_run):
    """Before min_tokens tokens no stop token is chosen (the greedy answer's first token, made a stop token, is
    passed over) and no stop string ends the answer (one the free run completes with its `used`-th token is passed
    over, streamed or not, when min_tokens is one more); REST and gRPC."""
    ids, texts = free_run
    stopped = complete(client, max_tokens=8, temperature=0, extra={"stop_token_ids": [ids[0]]}).choices[0]
    assert (stopped.token_ids, stopped.finish_reason) == ([ids[0]], "stop")
    held = complete(client, max_tokens=8, temperature=0, extra={"stop_token_ids": [ids[0]], "min_tokens": 1})
    assert held.choices[0].token_ids[0] != ids[0]
    stop, answer, used = stop_case(free_run, 2)
    full = texts[-1]
    assert full.count(stop) == 1  # so, passed over, it ends nothing later
    assert complete(client, max_tokens=32, temperature=0, stop=stop, extra={"min_tokens": used}).choices[0] \
        .message.content == answer  # its `used`-th token completes it: from there on it counts
    r = complete(client, max_tokens=32, temperature=0, stop=stop, extra={"min_tokens": used + 1})
    assert (r.choices[0].message.content, r.choices[0].finish_reason, r.choices[0].token_ids) == (full, "length", ids)
    assert stream(client, max_tokens=32, temperature=0, stop=stop, extra={"min_tokens": used + 1})[:2] == \
        ({0: full}, {0: "length"})
    request = pb.ChatRequest(model=MODEL, messages=to_grpc(ASK), max_tokens=32, temperature=0, ignore_eos=True,
                             stop=[stop], min_tokens=used + 1)
    assert (gateway.Chat(request, timeout=60).text, "".join(p.text for p in gateway.ChatStream(request, timeout=60))) \
        == (full, full)


def test_a_final_assistant_message_is_continued(client, gateway, reference):
    """continue_final_message: the prompt is transformers' rendering with continue_final_message, and the answer is
    the model's greedy continuation of it (checked token by token against transformers); add_generation_prompt=False
    ends the prompt after the last message; REST and gRPC alike."""
    chat = ASK + [{"role": "assistant", "content": "Once upon a time"}]
    tok = reference.tokenizer
    prompt = tok(tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)).input_ids
    r = complete(client, chat, max_tokens=6, temperature=0,
                 extra={"continue_final_message": True, "add_generation_prompt": False})
    out = r.choices[0].token_ids
    assert r.usage.prompt_tokens == len(prompt)
    with torch.no_grad():
        logits = reference.model(input_ids=torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1:]
    assert logits.argmax(-1).tolist() == out
    assert r.choices[0].message.content == reference.text(out)
    closed = complete(client, chat, max_tokens=1, extra={"add_generation_prompt": False})
    assert closed.usage.prompt_tokens == len(tok(tok.apply_chat_template(chat, tokenize=False)).input_ids)
    answer = gateway.Chat(pb.ChatRequest(model=MODEL, messages=to_grpc(chat), max_tokens=6, temperature=0,
                                         ignore_eos=True, continue_final_message=True, add_generation_prompt=False),
                          timeout=30)
    assert list(answer.token_ids) == out


BAD = [
    ({"foo": 1}, "`foo` is not supported"),
    # OpenAI's types, strictly: nothing is read as what the client may not have meant.
    ({"stream": "yes"}, "stream: Input should be a valid boolean"),
    ({"stream": 1}, "stream: Input should be a valid boolean"),
    ({"logprobs": "yes"}, "logprobs: Input should be a valid boolean"),
    ({"max_tokens": True}, "max_tokens: Input should be a valid integer"),
    ({"n": 2.0}, "n: Input should be a valid integer"),
    ({"temperature": True}, "temperature: Input should be a valid number"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage: Input should be a valid boolean"),
    ({"stream_options": {"include_usage": True}}, "`stream_options` is only allowed when `stream` is true"),
    ({"messages": [{"role": "user", "content": []}]}, "messages.0.content: List should have at least 1 item"),
    ({"messages": [{"role": "user", "content": "hi", "refusal": "no"}]},
     "messages.0: `refusal` is only allowed in an assistant message"),
    ({"max_tokens": 20000}, "max_tokens=20000 exceeds the "),
    ({"max_completion_tokens": 20000}, "max_completion_tokens=20000 exceeds the "),
    ({"continue_final_message": True, "messages": ASK + [{"role": "assistant", "content": "A"}]},
     "`continue_final_message` needs `add_generation_prompt` set to false"),
    ({"continue_final_message": True, "add_generation_prompt": False},
     "`continue_final_message` needs an assistant message last"),
    ({"min_tokens": 3}, "`min_tokens` (3) must be at most `max_tokens` (2)"),
    ({"min_tokens": -1}, "min_tokens: Input should be greater than or equal to 0"),
    ({"logit_bias": {"x": 5}}, "logit_bias.x: Input should be a valid integer"),
    ({"logit_bias": {"1": 101}}, "logit_bias.1: Input should be less than or equal to 100"),
    ({"logit_bias": {str(10 ** 8): 1}}, "logit_bias token ids must be in [0, "),
    ({"logit_bias": dict.fromkeys(map(str, range(301)), 1)}, "logit_bias: Dictionary should have at most 300 items"),
    ({"stop": 5}, "stop: must be"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop: must be"),
    ({"stop": ""}, "stop: must be"),
    ({"stop": [""]}, "stop: must be"),
    ({"top_logprobs": 2}, "`top_logprobs` needs `logprobs`"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 9}, "n=9 exceeds the server's limit of 8"),
    ({"n": 0}, "n:"),
]


@pytest.mark.parametrize("fields,message", BAD, ids=[next(iter(f)) + "=" + str(next(iter(f.values()))) for f, _ in BAD])
def test_refused_fields_are_400_and_the_service_keeps_serving(stack, fields, message):
    url = stack.gateway_url + "/v1/chat/completions"
    r = httpx.post(url, timeout=30, json={"model": MODEL, "messages": ASK, "max_tokens": 2, **fields})
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert httpx.post(url, timeout=30, json={"model": MODEL, "messages": ASK, "max_tokens": 2}).status_code == 200


def test_harmless_metadata_is_accepted(client, stack):
    r = httpx.post(stack.gateway_url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": ASK, "max_tokens": 2, "user": "u-1", "metadata": {"team": "a"}, "store": False,
        "service_tier": "auto", "parallel_tool_calls": True, "stream_options": None, "tools": [],
        "response_format": {"type": "text"}, "safety_identifier": "x", "prompt_cache_key": "k"})
    assert r.status_code == 200, r.text
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, user="u-2", metadata={"a": "b"},
                                       store=False, service_tier="auto")
    assert r.choices[0].finish_reason == "length"
    named = [{**m, "name": "alice"} for m in ASK]  # a participant's name: the templates do not use it
    assert client.chat.completions.create(model=MODEL, messages=named, max_tokens=2, temperature=0).choices[0] \
        .message.content == client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2,
                                                           temperature=0).choices[0].message.content


def test_a_refused_field_is_the_errors_param(stack):
    """OpenAI's `param`: the field as the client wrote it, also for a rule across fields or a length the context
    cannot hold."""
    for fields, param in [({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": True}}, "stream_options"),
                          ({"top_logprobs": 2}, "top_logprobs"), ({"min_tokens": 3}, "min_tokens"),
                          ({"max_tokens": 20000}, "max_tokens"), ({"max_completion_tokens": 20000},
                                                                  "max_completion_tokens"),
                          ({"messages": [{"role": "user", "content": []}]}, "messages.0.content"), ({"foo": 1}, "foo")]:
        r = httpx.post(stack.gateway_url + "/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": ASK, "max_tokens": 2, **fields})
        assert (r.status_code, r.json()["error"]["param"]) == (400, param), (fields, r.json())


def test_an_answer_sent_back_as_history_may_be_a_refusal_or_empty(client):
    """OpenAI's assistant messages may have null content or be a refusal (the `refusal` field, or refusal parts): as
    history that is what the assistant said, its text (null: nothing), the same prompt as the plain text gives."""
    def answer(said) -> tuple[int, str]:
        r = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
            *ASK, said, {"role": "user", "content": "Go on."}])
        return r.usage.prompt_tokens, r.choices[0].message.content

    text = answer({"role": "assistant", "content": "I will not."})
    assert answer({"role": "assistant", "content": None, "refusal": "I will not."}) == text
    assert answer({"role": "assistant", "content": [{"type": "refusal", "refusal": "I will not."}]}) == text
    assert answer({"role": "assistant", "content": None}) == answer({"role": "assistant", "content": ""})


def test_grpc_refuses_bad_sampling_fields(gateway):
    for fields in ({"stop": [""]}, {"top_logprobs": 3}, {"n": 9}, {"logit_bias": {1: -101.0}},
                   {"logit_bias": {10 ** 8: 1.0}}, {"min_tokens": 3},
                   {"continue_final_message": True, "add_generation_prompt": False}, {"max_tokens": 20000},
                   {"messages": [pb.ChatMessage(role="user")]}):
        with pytest.raises(grpc.RpcError) as e:
            gateway.Chat(pb.ChatRequest(**{"model": MODEL, "messages": to_grpc(ASK), "max_tokens": 2, **fields}),
                         timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
    # A seed is a uint64 (a string in protobuf's JSON form): read as the number it is.
    seeded = pb.ChatRequest(model=MODEL, messages=to_grpc(ASK), max_tokens=4, seed=2 ** 63 + 5)
    assert gateway.Chat(seeded, timeout=30).text == gateway.Chat(seeded, timeout=30).text
