"""Prompts: the checkpoint's chat template, each image expanded to <img> + <IMG_CONTEXT> x (tokens per tile x tiles) + </img>."""
import json
from pathlib import Path

from transformers import AutoTokenizer

from services.gateway.errors import bad_request
from services.gateway.schema import ImagePart, Message

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


class PromptBuilder:
    def __init__(self, path: Path, tokens_per_tile: int):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{path}: the tokenizer has no chat template")
        self.tokens_per_tile = tokens_per_tile
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.stop_token_ids = sorted(_eos_ids(path) | {self.tokenizer.eos_token_id} - {None})

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
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def token_ids(self, messages: list[Message], tiles_per_image: list[int]) -> list[int]:
        pieces = self.render(messages).split(IMG_CONTEXT)
        if len(pieces) != len(tiles_per_image) + 1:
            raise ValueError(f"chat template placed {len(pieces) - 1} images, expected {len(tiles_per_image)}")
        text = pieces[0]
        for tiles, piece in zip(tiles_per_image, pieces[1:]):
            text += IMG_START + IMG_CONTEXT * (self.tokens_per_tile * tiles) + IMG_END + piece
        return self.tokenizer(text)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _eos_ids(path: Path) -> set[int]:
    """The end-of-turn ids the checkpoint's generation config names."""
    gen = path / "generation_config.json"
    if not gen.exists():
        return set()
    eos = json.loads(gen.read_text()).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else {eos} - {None}
