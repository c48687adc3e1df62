"""Prompts: the model's chat template, each image expanded to <img> + <IMG_CONTEXT> x (256 x tiles) + </img>.

Original (OpenGVLab) checkpoints name a conversation template (`template` in config.json), rendered as their
conversation.py does; transformers-native checkpoints carry a jinja chat template, rendered by the tokenizer.
"""
import json
from pathlib import Path

from services.common.checkpoint import ModelConfig
from services.common.tokenizer import load_tokenizer
from services.gateway import templates
from services.gateway.errors import bad_request
from services.gateway.schema import ImagePart, Message

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


class PromptBuilder:
    def __init__(self, path: Path, cfg: ModelConfig):
        self.tokenizer = load_tokenizer(path)
        self.template = templates.conversation_template(cfg.template, cfg.template_era) if cfg.template else None
        if self.template is None and not self.tokenizer.chat_template:
            raise ValueError(f"{path}: neither a `template` in config.json nor a chat template in the tokenizer")
        self.tokens_per_tile = cfg.tokens_per_tile
        stops = _eos_ids(path) | {self.tokenizer.eos_token_id}
        if self.template:
            stops |= {self.tokenizer.convert_tokens_to_ids(s) for s in templates.stop_strings(self.template)}
        self.stop_token_ids = sorted(stops - {None, self.tokenizer.unk_token_id})

    def render(self, messages: list[Message]) -> str:
        """The template's text, with one <IMG_CONTEXT> placeholder where each image stands."""
        chat = []
        for m in messages:
            parts = []
            for p in m.parts():
                if isinstance(p, ImagePart):
                    parts.append({"type": "image"})
                else:
                    for token in (IMG_START, IMG_END, IMG_CONTEXT):
                        if token in p.text:
                            raise bad_request(f"message text may not contain the image token {token}", "messages")
                    parts.append({"type": "text", "text": p.text})
            chat.append({"role": m.role, "content": parts})
        if self.template is None:
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return self._render_conversation(chat)

    def _render_conversation(self, chat: list[dict]) -> str:
        # As the cards' `<image>\n` + question: an image part stands on a line of its own where the user put it.
        def text(content: list[dict]) -> str:
            return "".join(IMG_CONTEXT + "\n" if p["type"] == "image" else p["text"] for p in content)

        system = [text(m["content"]) for m in chat if m["role"] == "system"]
        turns = [(m["role"], text(m["content"])) for m in chat if m["role"] != "system"]
        if any(IMG_CONTEXT in s for s in system):
            raise bad_request("system messages may not contain images", "messages")
        return templates.render(self.template, turns, "\n".join(system) if system else None)

    def expand(self, rendered: str, tiles_per_image: list[int]) -> list[int]:
        """Token ids of a rendered prompt, each image placeholder expanded to its tiles' context tokens.

        Equal to tokenizing the expanded string: the prompt is tokenized whole, in one call, with one context token
        per image (so tokenizers whose word-boundary marker depends on where a segment stands see the text as it
        stands in the full prompt), then each image's context token is repeated, instead of tokenizing the tens of
        thousands of context tokens themselves.
        """
        images = rendered.count(IMG_CONTEXT)
        if images != len(tiles_per_image):  # a template that drops or repeats image parts
            raise bad_request(f"the chat template placed {images} images, the request has "
                              f"{len(tiles_per_image)}", "messages")
        context = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        ids = self.tokenizer(rendered.replace(IMG_CONTEXT, IMG_START + IMG_CONTEXT + IMG_END))["input_ids"]
        tiles = iter(tiles_per_image)
        expanded = []
        for token in ids:
            if token == context:
                expanded += [context] * (self.tokens_per_tile * next(tiles))
            else:
                expanded.append(token)
        return expanded


def _eos_ids(path: Path) -> set[int]:
    """The end-of-turn ids the checkpoint's generation config names."""
    gen = path / "generation_config.json"
    if not gen.exists():
        return set()
    eos = json.loads(gen.read_text()).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else {eos} - {None}
