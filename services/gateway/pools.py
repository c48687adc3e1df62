"""What the pools serve now, from the facts their endpoints report (`Balancer(check=...)`).

Only endpoints of the gateway's own checkpoint get calls (its tokenizer and template build the prompts). Within that
checkpoint the vision weights may change under the gateway (a rolling update, another dtype): the cache keys follow
the weights most of the vision pool runs, so the cache works again as soon as the pool has moved.
"""
import logging
import time
from collections import Counter

from internvl.serving.v1 import serving_pb2 as pb
from services.common.cache import decode_value, read_fields
from services.gateway.balancer import Balancer, Check

log = logging.getLogger(__name__)


def same_checkpoint(checkpoint: str) -> Check:
    """A `Balancer` check: the endpoint serves `checkpoint` (the gateway's)."""
    def check(info: pb.ModelInfo) -> str | None:
        if info.checkpoint != checkpoint:
            return (f"it serves {info.model} checkpoint {info.checkpoint}, the gateway {checkpoint}: checkpoints "
                    "are not mixed (roll the gateway with the pools)")
        return None
    return check


class Pools:
    """The two pools and their current facts. `fingerprint` and `max_model_len` are what the pools report once their
    endpoints' facts are read; the values given here hold until then (and for pools without a `check`)."""

    def __init__(self, vision: Balancer, decoder: Balancer, fingerprint: str = "", tokens_per_tile: int = 256,
                 max_model_len: int = 0, recheck_s: float = 5.0):
        self.vision, self.decoder, self.tokens_per_tile = vision, decoder, tokens_per_tile
        self._fingerprint, self._max_model_len = fingerprint, max_model_len
        self.recheck_s, self._rechecked = recheck_s, 0.0

    @property
    def fingerprint(self) -> str:
        """The vision weights of the cache keys: those most vision endpoints in rotation run, the most recently read
        among as many; while none is in rotation, the last ones (cache hits need no vision endpoint)."""
        newest_first = [info.fingerprint for info in reversed(self.vision.infos())]
        if newest_first:
            counts = Counter(newest_first)
            fingerprint = max(newest_first, key=counts.__getitem__)  # max keeps the first of equals: the newest
            if fingerprint != self._fingerprint:
                log.log(logging.WARNING if self._fingerprint else logging.INFO,
                        "vision pool: weights %s (were %s); the cache keys follow", fingerprint,
                        self._fingerprint or "unknown")
                self._fingerprint = fingerprint
        return self._fingerprint

    @property
    def max_model_len(self) -> int:
        """The shortest context among the decoder endpoints in rotation (a prompt must fit wherever it goes)."""
        if lengths := [info.max_model_len for info in self.decoder.infos()]:
            self._max_model_len = min(lengths)
        return self._max_model_len

    @property
    def decoder_reads_cache(self) -> bool:
        """Images may go to the decoder by cache key: every decoder endpoint in rotation reads Redis itself."""
        infos = self.decoder.infos()
        return bool(infos) and all(info.reads_cache for info in infos)

    def cached(self, raw: bytes) -> pb.CachedEmbeddings | None:
        """A cache value if it is usable. One from other vision weights means an endpoint's weights changed without
        its connection dropping (e.g. behind a proxy): the vision pool's facts are read again (at most every
        `recheck_s`). Its dtype and shape, not its rows (`cache.value_rows`)."""
        fingerprint = self.fingerprint
        value = decode_value(raw, fingerprint, self.tokens_per_tile)
        if value is None and time.monotonic() - self._rechecked >= self.recheck_s:
            if (other := read_fields(raw)) is not None and other.fingerprint not in ("", fingerprint):
                self._rechecked = time.monotonic()
                self.vision.recheck()
        return value
