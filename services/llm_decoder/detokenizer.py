"""Text deltas for a stream of generated tokens, adding up exactly to the decode of all of them; stop strings."""
import re

from tokenizers import Tokenizer, decoders
from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# InternVL's grounding markup: added as special tokens, yet part of the answer (the cards' slow tokenizer keeps them,
# as they are not in its special_tokens_map), so they are never skipped like the control tokens.
GROUNDING_TOKENS = frozenset({"<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"})


class TextDecoder:
    """What incremental decoding needs to know about a tokenizer (computed once, shared by every stream)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # Control tokens (end of turn, image markers, ...): skipped as decode(skip_special_tokens=True) skips them,
        # before its decoders run; the grounding tokens stay in the text.
        self.special = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items()
                                 if t.special and t.content not in GROUNDING_TOKENS)
        # Byte-fallback pieces: a run of them decodes as one unit, and an invalid run becomes one U+FFFD per byte, so
        # text of a run is known only once the run has ended (even bytes forming a valid character may be undone).
        self.byte_pieces = frozenset(i for t, i in tokenizer.get_vocab(with_added_tokens=False).items()
                                     if _BYTE_PIECE.fullmatch(t))
        # A byte-level vocabulary spells each byte as one character, so a piece that holds part of a character still
        # gives its bytes back (decoding it gives U+FFFD).
        self.byte_level = {c: b for b, c in bytes_to_unicode().items()} \
            if isinstance(tokenizer.decoder, decoders.ByteLevel) else None
        self.added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._bytes: dict[int, bytes] = {}

    def stream(self, context: list[int] = ()) -> "Detokenizer":
        return Detokenizer(self, context)

    def decode(self, ids: list[int], context: list[int] = ()) -> str:
        """The answer's text: control tokens skipped, grounding tokens kept; as it reads after `context`."""
        text = self.tokenizer.decode([i for i in (*context, *ids) if i not in self.special], skip_special_tokens=False)
        return text[len(self.decode(context)):] if context else text

    def context(self, prompt_ids: list[int]) -> list[int]:
        """What an answer that continues the prompt's text (a prefilled message) is decoded after: the prompt's last
        token where the decoder drops a first token's leading space (sentencepiece's), so the answer keeps it.
        Byte-level pieces spell their own spaces; a control token or a byte piece gives no context."""
        last = prompt_ids[-1:]
        plain = last and last[0] not in self.special and last[0] not in self.byte_pieces
        return last if plain and self.byte_level is None else []

    def token_bytes(self, token_id: int, first: bool = False) -> bytes:
        """A token's bytes in the answer (OpenAI's log-probability `bytes`): joined, a text's tokens give its UTF-8,
        also where a character is split over tokens. `first`: the answer's first text token, whose leading space the
        sentencepiece decoders drop. A control token is spelled as it is, though the text skips it."""
        if token_id not in self._bytes:
            self._bytes[token_id] = self._piece_bytes(token_id)
        raw = self._bytes[token_id]
        return raw[1:] if first and raw.startswith(b" ") and not self.decode([token_id]).startswith(" ") else raw

    def _piece_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if token_id in self.added:
            return self.added[token_id].encode()
        if token_id in self.byte_pieces:
            return bytes([int(piece[3:5], 16)])
        if self.byte_level is not None:
            return bytes(self.byte_level[c] for c in piece)
        if self.tokenizer.decoder is None:  # pieces are joined with spaces: no bytes of its own to give
            return self.tokenizer.decode([token_id]).encode()
        # Any other decoder ("▁" for a space, "##" to join, ...): the piece as it reads after another piece.
        return self.tokenizer.decoder.decode(["a", piece])[1:].encode()


class Detokenizer:
    """Incremental decoding by re-decoding a short window of tokens (as vLLM's and tokenizers' DecodeStream).

    The window's first tokens give the new ones their context (leading spaces, merged bytes). It only ever starts
    where the text before it is final: after a token that ends a character and is not inside a byte-fallback run.
    So every delta is final when it is sent, and the deltas plus `finish()` equal the decode of all ids. Text is
    held back while a character or a byte run is incomplete; `finish` returns what is held when generation stops.
    """

    def __init__(self, decoder: TextDecoder, context: list[int] = ()):
        self.decoder = decoder
        self.ids: list[int] = list(context)  # TextDecoder.context: the first window's context
        self.prefix, self.read = 0, len(self.ids)  # window: ids[prefix:read] were decoded already, ids[read:] are new

    def step(self, token_id: int) -> str:
        if token_id in self.decoder.special:
            return ""
        self.ids.append(token_id)
        if token_id in self.decoder.byte_pieces:  # the run may go on
            return ""
        before, text = self._window()
        if len(text) <= len(before) or text.endswith("\ufffd"):  # nothing new, or a character is incomplete
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def finish(self) -> str:
        before, text = self._window()
        return text[len(before):]

    def _window(self) -> tuple[str, str]:
        return (self.decoder.decode(self.ids[self.prefix:self.read]), self.decoder.decode(self.ids[self.prefix:]))


class StopStrings:
    """Ends a stream of final text at the first stop string, the stop string excluded (or included, `include`).

    Text is held back only while it could still be the start of a stop string (its tail is a prefix of one), so a
    stop string split over several tokens is found and never partly sent.
    """

    def __init__(self, stop: list[str], include: bool = False):
        self.stop, self.held, self.include = stop, "", include

    def push(self, text: str, look: bool = True) -> tuple[str, bool]:
        """The text that can be sent now, and whether a stop string ended the answer there: one that ends in this
        push's text, if `look` (text pushed without looking is held back the same, so one that begins there and ends
        in a later push is found)."""
        if not self.stop:
            return text, False
        # Whatever was sent cannot begin a match: a match starts in the held text or after it. One inside the held
        # text was passed over by a push that did not look.
        held, text, self.held = len(self.held), self.held + text, ""
        found = [(i, len(s)) for i, s in ((text.find(s, max(0, held - len(s) + 1)), s) for s in self.stop) if i >= 0] \
            if look else []
        if found:
            i, n = min(found)  # the one that starts first (the shorter of two that start together)
            return text[:i + n if self.include else i], True
        keep = max(next((n for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), 0)
                   for s in self.stop)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def finish(self) -> str:
        """The held text, when the answer ends otherwise."""
        held, self.held = self.held, ""
        return held
