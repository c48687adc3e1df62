"""Prompts: the model's chat template, each image expanded to <img> + <IMG_CONTEXT> x (256 x tiles) + </img>.

Original (OpenGVLab) checkpoints name a conversation template (`template` in config.json), rendered as their
conversation.py does; transformers-native checkpoints carry a jinja chat template, rendered by the tokenizer.
"""
import json
from pathlib import Path

from pydantic import ValidationError

from services.common.checkpoint import ModelConfig
from services.common.tokenizer import load_tokenizer
from services.gateway import templates
from services.gateway.errors import bad_request
from services.gateway.schema import ChatCompletionRequest, ImagePart, Message, TextPart, VideoPart

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"  # where the cards' prompts put an image
Media = ImagePart | VideoPart


class PromptBuilder:
    def __init__(self, path: Path, cfg: ModelConfig):
        self.tokenizer = load_tokenizer(path)
        if not self.tokenizer.chat_template:
            self.tokenizer.chat_template = processor_chat_template(path)
        self.template =  templates.conversation_template(cfg.template, cfg.template_era) if cfg.template else None
        if self.template is None and not self.tokenizer.chat_template:
            raise ValueError(f"{path}: neither a `template` in config.json nor a chat template in the tokenizer")
        self.tokens_per_tile = cfg.tokens_per_tile
        stops = _eos_ids(path) | {self.tokenizer.eos_token_id}
        if self.template:
            stops |= {self.tokenizer.convert_tokens_to_ids(s) for s in templates.stop_strings(self.template)}
        self.stop_token_ids = sorted(stops - {None, self.tokenizer.unk_token_id})

    def render(self, messages: list[Message], default_num_segments: int = 8, generation_prompt: bool = True,
               continue_final: bool = False) -> tuple[str, list[Media]]:
        """The template's text, with one <IMG_CONTEXT> placeholder where each image or video frame stands, and the
        image and video parts in the order of their placeholders (a video has one per frame). It ends with the
        assistant's turn opened (`generation_prompt`), after the last turn, or inside it (`continue_final`: the
        model continues the final message)."""
        chat, media = [], []
        for m in messages:
            text, placed = _message_text(m, default_num_segments)
            if placed and m.role == "system":
                raise bad_request("system messages may not contain images or videos", "messages")
            chat.append({"role": m.role, "content": [{"type": "text", "text": text}]})
            media += placed
        if continue_final and not chat[-1]["content"][0]["text"].strip():
            # Nothing to continue: an empty answer so far is the generation prompt (transformers would cut nothing).
            chat.pop()
            generation_prompt, continue_final = True, False
        if self.template is None:
            # Images are already placed as text, so every jinja template places them by the same rule.
            try:
                return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt,
                                                          continue_final_message=continue_final), media
            except ValueError as e:  # a template that changes the final message's text: it cannot be continued
                raise bad_request(str(e), "continue_final_message") from e
        system = [m["content"][0]["text"] for m in chat if m["role"] == "system"]
        turns = [(m["role"], m["content"][0]["text"]) for m in chat if m["role"] != "system"]
        return templates.render(self.template, turns, "\n".join(system) if system else None, generation_prompt,
                                continue_final), media

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


def processor_chat_template(path: Path) -> str | None:
    """A chat template saved with the processor rather than the tokenizer, where transformers' processors also find
    one: chat_template.json (as transformers wrote it before chat_template.jinja) or processor_config.json."""
    for name in ("chat_template.json", "processor_config.json"):
        if (path / name).exists():
            template = json.loads((path / name).read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def _message_text(m: Message, default_num_segments: int) -> tuple[str, list[Media]]:
    """A message as text, by LMDeploy's rule: each image part becomes `<image>\\n` where it stands (an image first
    gives the cards' `<image>\\n{question}`), unless the text holds `<image>` placeholders, which the message's
    images then fill in order. A video becomes the cards' `Frame1: <image>\\nFrame2: <image>\\n...` where it stands.
    <IMG_CONTEXT> stands for each `<image>`; the media are returned in the order of their placeholders."""
    parts = m.parts()
    for p in parts:
        for token in (IMG_START, IMG_END, IMG_CONTEXT):
            if isinstance(p, TextPart) and token in p.text:
                raise bad_request(f"message text may not contain the image token {token}", "messages")
    images = [p for p in parts if isinstance(p, ImagePart)]
    typed = sum(p.text.count(IMAGE_PLACEHOLDER) for p in parts if isinstance(p, TextPart))
    if typed and typed != len(images):
        raise bad_request(f"a {m.role} message's text has {typed} {IMAGE_PLACEHOLDER} placeholders for its "
                          f"{len(images)} images", "messages")
    unplaced = iter(images)
    text, media = [], []
    for p in parts:
        if isinstance(p, TextPart):
            pieces = p.text.split(IMAGE_PLACEHOLDER)
            text.append(IMG_CONTEXT.join(pieces))
            media += [next(unplaced) for _ in pieces[1:]]
        elif isinstance(p, VideoPart):
            frames = p.video_url.num_segments or default_num_segments
            text += [f"Frame{i + 1}: {IMG_CONTEXT}\n" for i in range(frames)]
            media.append(p)
        elif not typed:
            text.append(IMG_CONTEXT + "\n")
            media.append(p)
    return "".join(text), media


# generation_config.json's sampling keys, by the request field each one is the default of (vLLM's list)
SAMPLING_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def _generation_config(path: Path) -> dict:
    gen = path / "generation_config.json"
    return json.loads(gen.read_text()) if gen.exists() else {}


def _eos_ids(path: Path) -> set[int]:
    """The end-of-turn ids the checkpoint's generation config names."""
    eos = _generation_config(path).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else {eos} - {None}


def sampling_defaults(path: Path) -> dict:
    """The sampling settings the checkpoint's generation_config.json recommends, as request fields: what a request
    that does not set them gets (as vLLM's default --generation-config auto). Checked as a request's would be."""
    config = _generation_config(path)
    defaults = {field: config[key] for key, field in SAMPLING_DEFAULTS.items() if config.get(key) is not None}
    try:
        ChatCompletionRequest(model="m", messages=[Message(role="user", content="x")], **defaults)
    except ValidationError as e:
        raise ValueError(f"{path / 'generation_config.json'}: sampling defaults {defaults} are not valid request "
                         f"settings: {e}") from e
    return defaults
