"""Conversation templates of the original OpenGVLab checkpoints (config.json `"template"`).

Those checkpoints have no usable jinja chat template; `model.chat()` renders prompts with the
MPT separator style of their `conversation.py`. This module reproduces those strings exactly
(reference: INTERNVL_REFERENCE.md section 4.3) so the gateway's prompts match `model.chat()`.
"""
from dataclasses import dataclass

# Default system messages, byte-exact: the model was trained with them, so changing even the
# punctuation shifts its behaviour.
SYS25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SYS20 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYS15 = "You are an AI assistant whose name is InternLM (书生·浦语)."

ERAS = ("2.0", "1.5")


@dataclass(frozen=True)
class ConversationTemplate:
    """One template: `system_template` holds a `{system_message}` slot; roles are (user, assistant) prefixes."""

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    stop_str: str | None = None  # an extra turn-ending string besides sep.strip()


_IM_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
_IM_SYSTEM = "<|im_start|>system\n{system_message}"

_TEMPLATES = {
    # internvl2_5 is the only ChatML variant with a newline after <|im_end|>.
    "internvl2_5": ConversationTemplate("internvl2_5", _IM_SYSTEM, SYS25, _IM_ROLES, "<|im_end|>\n"),
    "internlm2-chat": ConversationTemplate("internlm2-chat", _IM_SYSTEM, SYS20, _IM_ROLES, "<|im_end|>"),
    # Renders like internlm2-chat; the Nous-Hermes LLM may also end a turn with <|endoftext|>.
    "Hermes-2": ConversationTemplate("Hermes-2", _IM_SYSTEM, SYS20, _IM_ROLES, "<|im_end|>", "<|endoftext|>"),
    "phi3-chat": ConversationTemplate(
        "phi3-chat", "<|system|>\n{system_message}", SYS20, ("<|user|>\n", "<|assistant|>\n"), "<|end|>"
    ),
}
# InternVL-Chat-V1-5 ships an older conversation.py whose internlm2-chat has an English system prompt.
_V15_TEMPLATES = {
    "internlm2-chat": ConversationTemplate("internlm2-chat", _IM_SYSTEM, SYS15, _IM_ROLES, "<|im_end|>"),
}


def conversation_template(name: str, era: str = "2.0") -> ConversationTemplate:
    """The template called `name` in config.json; `era="1.5"` selects the InternVL-Chat-V1-5 variant."""
    if era not in ERAS:
        raise ValueError(f"unknown template era {era!r}; supported: {', '.join(ERAS)}")
    table = _V15_TEMPLATES if era == "1.5" else _TEMPLATES
    if name not in table:
        # Fail loudly: a guessed template would silently degrade every answer.
        raise ValueError(f"unsupported conversation template {name!r} for era {era}; supported: {', '.join(table)}")
    return table[name]


def render(template: ConversationTemplate, messages: list[tuple[str, str]], system: str | None = None,
           generation_prompt: bool = True, continue_final: bool = False) -> str:
    """The prompt `model.chat()` builds: system block, each turn, then the open assistant prefix.

    `messages` are ("user" | "assistant", text) pairs, oldest first (history then the new question);
    `system` replaces the template's default system message when not None. Without `generation_prompt` the prompt
    ends after the last turn; with `continue_final` it ends inside the last turn, which the model continues (as
    transformers' and vLLM's add_generation_prompt and continue_final_message).
    """
    role_prefix = dict(zip(("user", "assistant"), template.roles))
    sys_msg = template.system_message if system is None else system
    out = [template.system_template.format(system_message=sys_msg) + template.sep]
    for role, text in messages:
        if role not in role_prefix:
            raise ValueError(f"unknown role {role!r}; expected 'user' or 'assistant'")
        out.append(role_prefix[role] + text + template.sep)
    if continue_final and messages:
        out[-1] = out[-1][:-len(template.sep)]
    elif generation_prompt:
        out.append(template.roles[1])  # no sep: the model writes the answer next
    return "".join(out)


def stop_strings(template: ConversationTemplate) -> list[str]:
    """Strings that end an assistant turn, for the caller to map to stop token ids."""
    stops = [template.sep.strip()]
    if template.stop_str and template.stop_str not in stops:
        stops.append(template.stop_str)
    return stops
