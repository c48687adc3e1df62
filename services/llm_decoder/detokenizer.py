"""Text deltas for a stream of generated tokens."""
from tokenizers import Tokenizer


class Detokenizer:
    """Incremental decoding by re-decoding a short window of tokens (robust with byte-fallback tokenizers).

    A character split over several tokens is withheld until complete; `finish` returns what is still held when the
    generation stops (as replacement characters if it stopped inside a character), so nothing is dropped.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window: ids[prefix:read] were decoded already, ids[read:] are new

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        # The window's first tokens give the context (leading spaces, merged bytes) the new ones are decoded in.
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):  # nothing new, or a character is incomplete
            return ""
        delta = text[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def finish(self) -> str:
        return self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
