"""Text deltas for a stream of generated tokens."""
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Incremental decoding that, at the end, also emits what a streaming decoder holds back.

    A character split over several tokens is withheld until complete; if the generation stops in the middle of
    one, `finish` returns the rest so the concatenated deltas always equal decoding all tokens at once.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.stream = tokenizer, DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.emitted = ""

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.stream.step(self.tokenizer, token_id) or ""
        self.emitted += text
        return text

    def finish(self) -> str:
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return full[len(self.emitted):] if full.startswith(self.emitted) else ""
