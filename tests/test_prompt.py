"""Prompt building in the gateway: the checkpoint's template, image expansion, stop tokens, hub resolution."""
import json
import shutil

import pytest

from services.common.checkpoint import read_model_config, resolve_checkpoint
from services.gateway.errors import ApiError
from services.gateway.prompt import PromptBuilder
from services.gateway.schema import Message
from services.gateway.templates import SYS20
from tools.make_tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module")
def builder(tiny_checkpoint):
    return PromptBuilder(tiny_checkpoint, read_model_config(tiny_checkpoint))


def test_multi_turn_rendering_and_image_expansion(builder):
    messages = [Message(role="system", content="Be brief."),
                Message(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}},
                                              {"type": "text", "text": "What is it?"}]),
                Message(role="assistant", content="A cat."),
                Message(role="user", content="And the colour?")]
    assert builder.render(messages)[0] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nAnd the colour?<|im_end|>\n"
        "<|im_start|>assistant\n")
    ids = builder.expand(builder.render(messages)[0], tiles_per_image=[3])
    tok = builder.tokenizer
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids.count(context) == 3 * 256
    start = ids.index(tok.convert_tokens_to_ids("<img>"))
    assert ids[start + 1:start + 1 + 768] == [context] * 768
    assert ids[start + 769] == tok.convert_tokens_to_ids("</img>")


@pytest.mark.parametrize("file", ["chat_template.json", "processor_config.json"])
def test_a_chat_template_saved_with_the_processor_is_found(tiny_checkpoint, builder, tmp_path, file):
    """Native checkpoints saved by older transformers keep the template in chat_template.json (or the processor's
    config), not beside the tokenizer: the same prompt as from chat_template.jinja."""
    path = tmp_path / "older"
    shutil.copytree(tiny_checkpoint, path)
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / file).read_text()) if (path / file).exists() else {}
    (path / file).write_text(json.dumps({**config, "chat_template": template}))
    messages = [Message(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}},
                                              {"type": "text", "text": "What is it?"}])]
    assert PromptBuilder(path, read_model_config(path)).render(messages)[0] == builder.render(messages)[0]


def test_a_developer_message_is_the_system_prompt(builder, original_internvl2):
    for b in (builder, original_internvl2):  # a jinja template, and an original layout's conversation template
        as_system, as_developer = (b.render([Message(role=role, content="Be brief."),
                                             Message(role="user", content="hi")])[0]
                                   for role in ("system", "developer"))
        assert as_developer == as_system and "Be brief." in as_system and "developer" not in as_system


def test_a_final_assistant_message_is_continued_as_transformers_does(builder, original_internvl2):
    """continue_final_message: the prompt ends inside the last (assistant) message, as transformers' jinja rendering
    with continue_final_message, in both layouts; an empty one is the generation prompt (nothing to continue)."""
    chat = [{"role": "user", "content": "Tell a story."}, {"role": "assistant", "content": "Once upon a"}]
    messages = [Message(**m) for m in chat]
    continued = builder.render(messages, generation_prompt=False, continue_final=True)[0]
    assert continued == builder.tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert continued.endswith("<|im_start|>assistant\nOnce upon a")
    assert builder.render(messages, generation_prompt=False)[0] == \
        builder.tokenizer.apply_chat_template(chat, tokenize=False)
    assert original_internvl2.render(messages, generation_prompt=False, continue_final=True)[0].endswith(
        "<|im_end|><|im_start|>assistant\nOnce upon a")
    for b in (builder, original_internvl2):
        empty = messages[:1] + [Message(role="assistant", content=" ")]
        assert b.render(empty, generation_prompt=False, continue_final=True) == b.render(messages[:1])


def test_stop_tokens_are_the_templates_end_of_turn(builder):
    assert builder.stop_token_ids == [builder.tokenizer.convert_tokens_to_ids("<|im_end|>")]


@pytest.fixture(scope="module")
def original_internvl2(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("o") / "internvl2", family="internvl2", layout="original")
    return PromptBuilder(path, read_model_config(path))


def test_original_layout_uses_its_conversation_template(original_internvl2):
    messages = [Message(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}},
                                              {"type": "text", "text": "Q"}])]
    assert original_internvl2.render(messages)[0] == (
        f"<|im_start|>system\n{SYS20}<|im_end|><|im_start|>user\n<IMG_CONTEXT>\nQ<|im_end|>"
        "<|im_start|>assistant\n")
    tok = original_internvl2.tokenizer
    ids = original_internvl2.expand(original_internvl2.render(messages)[0], tiles_per_image=[1])
    assert ids[0] == tok.convert_tokens_to_ids("<s>")  # InternLM2 prepends BOS, as model.chat() does
    assert tok.convert_tokens_to_ids("<|im_end|>") in original_internvl2.stop_token_ids


def test_image_tokens_typed_by_the_user_are_refused(builder):
    with pytest.raises(ApiError) as e:
        builder.render([Message(role="user", content="look: <img></img>")])
    assert e.value.status == 400


def test_hub_ids_download_only_the_needed_shards(tiny_checkpoint, tmp_path, monkeypatch):
    """`MODEL=<hub id>`: metadata first, then only the shards holding the service's tensors."""
    import huggingface_hub
    snapshot = tmp_path / "snapshot"
    fetched = []

    def snapshot_download(repo_id, allow_patterns):
        assert repo_id == "OpenGVLab/tiny"
        shutil.copytree(tiny_checkpoint, snapshot, ignore=shutil.ignore_patterns("*.safetensors"))
        return str(snapshot)

    def hf_hub_download(repo_id, filename):
        fetched.append(filename)
        shutil.copy(tiny_checkpoint / filename, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    path = resolve_checkpoint("OpenGVLab/tiny", parts=("vision",))
    assert path == snapshot and fetched
    weight_map = json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(fetched) == {f for n, f in weight_map.items() if n.startswith(("vision_tower.", "multi_modal_projector."))}
    assert len(set(fetched)) < len(set(weight_map.values()))


def test_pools_with_different_shards_of_one_checkpoint_agree_on_its_id(tiny_checkpoint, tmp_path):
    """Each pool downloads only its own shards from the hub; the checkpoint id must not depend on which."""
    from services.common.checkpoint import checkpoint_id
    vision_only = tmp_path / "vision"
    shutil.copytree(tiny_checkpoint, vision_only)
    weight_map = json.loads((vision_only / "model.safetensors.index.json").read_text())["weight_map"]
    for f in {f for n, f in weight_map.items() if n.startswith("language_model.")}:
        (vision_only / f).unlink(missing_ok=True)
    assert checkpoint_id(vision_only) == checkpoint_id(tiny_checkpoint)


def test_the_gateway_needs_no_torch():
    """The gateway image installs no model code: importing it with torch and safetensors absent must work."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = sys.modules['safetensors'] = None; "
            "import services.gateway.__main__")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def chat_service(path, **limits):
    """The gateway's chat service for a checkpoint, with pools that have no endpoints (prepare never calls them) and
    a 4,096-token context."""
    from services.common.cache import EmbeddingCache
    from services.gateway.balancer import Balancer
    from services.gateway.chat import ChatService, Limits, Pools

    pools = Pools(Balancer("vision encoder", None), Balancer("LLM decoder", None), "", 256, 4096)
    return ChatService("m", PromptBuilder(path, read_model_config(path)), pools, EmbeddingCache(None, 0), None,
                       Limits(**limits))


async def test_stop_token_ids_and_ignore_eos_reach_the_decoder(tiny_checkpoint):
    from services.gateway.schema import ChatCompletionRequest

    chat = chat_service(tiny_checkpoint)
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    end_of_turn = chat.prompt.stop_token_ids
    [plain] = await chat.prepare(ChatCompletionRequest(**ask))
    assert list(plain.sampling.stop_token_ids) == end_of_turn
    [extra] = await chat.prepare(ChatCompletionRequest(**ask, stop_token_ids=[7, 3]))
    assert list(extra.sampling.stop_token_ids) == sorted({3, 7, *end_of_turn})
    [free] = await chat.prepare(ChatCompletionRequest(**ask, ignore_eos=True))
    assert list(free.sampling.stop_token_ids) == []
    assert list(plain.sampling.stop) == [] and not plain.sampling.HasField("logprobs")


async def test_the_checkpoints_sampling_defaults_fill_what_a_request_leaves_unset(tiny_checkpoint, tmp_path):
    """As vLLM's --generation-config auto: generation_config.json's temperature, top_p, top_k, min_p,
    repetition_penalty and max_new_tokens are the defaults of a request that does not set them (null is not set); a
    default length is cut to the context's room, and values no request could send stop the gateway at start-up."""
    from services.gateway.prompt import sampling_defaults
    from services.gateway.schema import ChatCompletionRequest

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.6, "top_p": 0.8, "top_k": 20,
                                                             "repetition_penalty": 1.05, "max_new_tokens": 10_000,
                                                             "do_sample": True}))
    defaults = sampling_defaults(path)
    assert defaults == {"temperature": 0.6, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                        "max_tokens": 10_000}
    assert sampling_defaults(tiny_checkpoint) == {}
    chat = chat_service(path, sampling_defaults=defaults)
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    [silent] = await chat.prepare(ChatCompletionRequest(**ask, temperature=None))
    s = silent.sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.min_p) == pytest.approx((0.6, 0.8, 20, 1.05, 0))
    assert s.max_tokens == 4096 - len(silent.token_ids)  # 10,000 by default, cut to the room
    [given] = await chat.prepare(ChatCompletionRequest(**ask, temperature=0, top_k=-1, max_completion_tokens=5))
    assert (given.sampling.temperature, given.sampling.top_k, given.sampling.max_tokens) == (0, -1, 5)
    assert given.sampling.top_p == pytest.approx(0.8)
    [plain] = await chat_service(path).prepare(ChatCompletionRequest(**ask))
    assert (plain.sampling.temperature, plain.sampling.top_p, plain.sampling.max_tokens) == (1, 1, 0)  # OpenAI's
    (path / "generation_config.json").write_text(json.dumps({**config, "top_p": 0}))
    with pytest.raises(ValueError, match="generation_config.json: sampling defaults"):
        sampling_defaults(path)


async def test_n_stop_and_logprobs_reach_the_decoder(tiny_checkpoint):
    """n choices are n decoder requests for the same prompt; seeded ones get distinct seeds, the same every time."""
    from services.gateway.schema import ChatCompletionRequest

    chat = chat_service(tiny_checkpoint, max_n=3)
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": "END", "logprobs": True,
           "top_logprobs": 2}
    seeded = await chat.prepare(ChatCompletionRequest(**ask, n=3, seed=11))
    assert len(seeded) == 3 and len({tuple(r.token_ids) for r in seeded}) == 1
    assert seeded[0].sampling.seed == 11 and len({r.sampling.seed for r in seeded}) == 3
    assert [r.sampling.seed for r in await chat.prepare(ChatCompletionRequest(**ask, n=3, seed=11))] == \
        [r.sampling.seed for r in seeded]
    assert all(list(r.sampling.stop) == ["END"] and r.sampling.logprobs == 2 for r in seeded)
    assert not any(r.sampling.HasField("seed") for r in await chat.prepare(ChatCompletionRequest(**ask, n=2)))
    [lp0] = await chat.prepare(ChatCompletionRequest(model="m", messages=ask["messages"], logprobs=True))
    assert lp0.sampling.HasField("logprobs") and lp0.sampling.logprobs == 0
    with pytest.raises(ApiError, match="n=4 exceeds the server's limit of 3"):
        await chat.prepare(ChatCompletionRequest(**ask, n=4))


def image(**extra) -> dict:
    return {"type": "image_url", "image_url": {"url": "x", **extra}}


# (user content, the cards' text of the user turn with <IMG_CONTEXT> for each <image>, images placed)
PLACEMENTS = [
    ([image(), {"type": "text", "text": "Q"}], "<IMG_CONTEXT>\nQ", 1),  # the cards' <image>\n{question}
    ([{"type": "text", "text": "Q "}, image()], "Q <IMG_CONTEXT>\n", 1),
    ([image(), image(), {"type": "text", "text": "Q"}], "<IMG_CONTEXT>\n<IMG_CONTEXT>\nQ", 2),
    ([{"type": "text", "text": "Image-1: <image>\nImage-2: <image>\nQ"}, image(), image()],
     "Image-1: <IMG_CONTEXT>\nImage-2: <IMG_CONTEXT>\nQ", 2),  # placeholders: filled in order, nothing added
    ([image(), {"type": "text", "text": "A <image> and "}, image(), {"type": "text", "text": "B <image>?"}],
     "A <IMG_CONTEXT> and B <IMG_CONTEXT>?", 2),
    ([{"type": "video_url", "video_url": {"url": "v", "num_segments": 3}}, {"type": "text", "text": "Q"}],
     "Frame1: <IMG_CONTEXT>\nFrame2: <IMG_CONTEXT>\nFrame3: <IMG_CONTEXT>\nQ", 1),  # the cards' video_prefix
]


@pytest.mark.parametrize("content,text,media", PLACEMENTS)
def test_images_are_placed_by_lmdeploys_rule_in_both_layouts(builder, original_internvl2, content, text, media):
    messages = [Message(role="user", content=content)]
    native, placed = builder.render(messages)
    assert native.endswith(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
    assert len(placed) == media
    original, _ = original_internvl2.render(messages)
    assert original == f"<|im_start|>system\n{SYS20}<|im_end|><|im_start|>user\n{text}<|im_end|><|im_start|>assistant\n"


def test_placeholders_take_the_images_in_order(builder):
    first, second = image(max_dynamic_patch=1), image(max_dynamic_patch=2)
    _, placed = builder.render([Message(role="user", content=[first, {"type": "text", "text": "<image> <image>"},
                                                              second])])
    assert [p.image_url.max_dynamic_patch for p in placed] == [1, 2]


@pytest.mark.parametrize("content", [
    [{"type": "text", "text": "Image-1: <image>\nImage-2: <image>\n"}, image()],
    [{"type": "text", "text": "<image> Q"}, image(), image()],
    [{"type": "text", "text": "what is <image>?"}],
])
def test_a_placeholder_count_that_is_not_the_image_count_is_refused(builder, content):
    with pytest.raises(ApiError) as e:
        builder.render([Message(role="user", content=content)])
    assert e.value.status == 400 and "placeholders" in e.value.message


def test_multi_turn_places_each_turns_images(builder):
    messages = [Message(role="user", content=[image(), {"type": "text", "text": "Q1"}]),
                Message(role="assistant", content="A1"),
                Message(role="user", content=[{"type": "text", "text": "Image-2: <image>\nQ2"}, image()])]
    text, placed = builder.render(messages)
    assert "user\n<IMG_CONTEXT>\nQ1<|im_end|>" in text and "user\nImage-2: <IMG_CONTEXT>\nQ2<|im_end|>" in text
    assert len(placed) == 2


def test_system_messages_may_not_hold_images(builder):
    with pytest.raises(ApiError):
        builder.render([Message(role="system", content=[image()]), Message(role="user", content="hi")])
