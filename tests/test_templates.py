"""Original-checkpoint conversation templates render exactly as INTERNVL_REFERENCE.md section 4.3."""
import dataclasses

import pytest

from services.gateway.templates import conversation_template, render, stop_strings

# Spelled out here rather than imported, so a typo in the module cannot hide in both places.
SYS25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SYS20 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
Q = [("user", "<image>\nQ")]


def test_internvl2_5_single_turn():
    t = conversation_template("internvl2_5")
    assert render(t, Q, None) == (
        f"<|im_start|>system\n{SYS25}<|im_end|>\n<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\n"
    )
    assert stop_strings(t) == ["<|im_end|>"]


def test_internvl2_5_two_turns():
    t = conversation_template("internvl2_5")
    msgs = [("user", "<image>\nQ1"), ("assistant", "A1"), ("user", "Q2")]
    assert render(t, msgs, None) == (
        f"<|im_start|>system\n{SYS25}<|im_end|>\n"
        "<|im_start|>user\n<image>\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_a_final_message_continued_or_no_generation_prompt():
    """As transformers' continue_final_message (the prompt ends inside the last turn, no end of turn) and
    add_generation_prompt=False (it ends after the last turn)."""
    t = conversation_template("internvl2_5")
    msgs = [("user", "<image>\nQ1"), ("assistant", "Once upon a")]
    head = f"<|im_start|>system\n{SYS25}<|im_end|>\n<|im_start|>user\n<image>\nQ1<|im_end|>\n<|im_start|>assistant\n"
    assert render(t, msgs, None, generation_prompt=False, continue_final=True) == head + "Once upon a"
    assert render(t, msgs, None, generation_prompt=False) == head + "Once upon a<|im_end|>\n"
    assert render(t, msgs, None) == head + "Once upon a<|im_end|>\n<|im_start|>assistant\n"


def test_internlm2_chat_2_0_has_no_newline_after_sep():
    t = conversation_template("internlm2-chat")
    assert render(t, Q, None) == (
        f"<|im_start|>system\n{SYS20}<|im_end|><|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\n"
    )
    assert stop_strings(t) == ["<|im_end|>"]


def test_internlm2_chat_v1_5_english_system():
    t = conversation_template("internlm2-chat", era="1.5")
    assert render(t, Q, None) == (
        "<|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).<|im_end|>"
        "<|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\n"
    )


def test_hermes_2_renders_like_internlm2_chat():
    t = conversation_template("Hermes-2")
    assert render(t, Q, None) == render(conversation_template("internlm2-chat"), Q, None)
    assert stop_strings(t) == ["<|im_end|>", "<|endoftext|>"]


def test_phi3_chat():
    t = conversation_template("phi3-chat")
    msgs = [("user", "<image>\nQ1"), ("assistant", "A1"), ("user", "Q2")]
    assert render(t, msgs, None) == (
        f"<|system|>\n{SYS20}<|end|><|user|>\n<image>\nQ1<|end|><|assistant|>\nA1<|end|><|user|>\nQ2<|end|><|assistant|>\n"
    )
    assert stop_strings(t) == ["<|end|>"]


def test_user_system_message_replaces_default():
    t = conversation_template("internvl2_5")
    out = render(t, [("user", "hi")], "Be {brief}.")  # braces must pass through untouched
    assert out == "<|im_start|>system\nBe {brief}.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert SYS25 not in out


def test_text_only_empty_history():
    out = render(conversation_template("internlm2-chat"), [], None)
    assert out == f"<|im_start|>system\n{SYS20}<|im_end|><|im_start|>assistant\n"


def test_template_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        conversation_template("internvl2_5").sep = "x"


def test_unknown_template_names_supported():
    with pytest.raises(ValueError) as e:
        conversation_template("vicuna_v1.1")
    for name in ("internvl2_5", "internlm2-chat", "Hermes-2", "phi3-chat"):
        assert name in str(e.value)


def test_unknown_era_and_unknown_role():
    with pytest.raises(ValueError, match="era"):
        conversation_template("internvl2_5", era="3.0")
    with pytest.raises(ValueError, match="internlm2-chat"):
        conversation_template("internvl2_5", era="1.5")
    with pytest.raises(ValueError, match="role"):
        render(conversation_template("internvl2_5"), [("system", "x")], None)
