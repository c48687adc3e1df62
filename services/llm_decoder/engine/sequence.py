"""A request inside the engine: its tokens, image embeddings, sampling settings and KV blocks."""
import enum
import uuid
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.llm_decoder.engine.sampler import PenaltyHistory


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: frozenset[int] = frozenset()
    seed: int | None = None
    top_k: int = 0                      # 0 or -1: off
    min_p: float = 0.0                  # 0: off
    repetition_penalty: float = 1.0     # 1: off; applies to prompt and output tokens
    presence_penalty: float = 0.0       # 0: off; applies to output tokens
    frequency_penalty: float = 0.0      # 0: off; applies to output tokens
    logprobs: int | None = None         # None: off; else each token's log-probability with this many alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its logit): OpenAI's logit_bias
    min_tokens: int = 0                 # stop tokens are not chosen before this many output tokens (as vLLM)

    @property
    def uses_penalties(self) -> bool:
        """True when the sampler needs this row's token history."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    image_embeds: torch.Tensor | None = None   # rows for the image-context positions, in order
    image_token_id: int = -1                    # which prompt tokens take image rows
    image_keys: list[tuple[str, int]] = field(default_factory=list)  # (identity, rows) of each image, in order
    token_ids: list[int] = field(init=False)    # the prompt, then the output as it comes back from the device
    num_pending: int = 0                        # tokens sampled on the device but not read back yet (overlap)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hash of each full block so far
    num_cached: int = 0                         # tokens whose K/V are in the cache
    row: int = -1                               # its row of the runner's device block table while it has blocks
    synced_blocks: int = 0                      # entries of block_table already copied to that row
    cached_tokens: int | None = None            # prompt tokens it took from the prefix cache when first admitted
    status: Status = Status.WAITING
    finish_reason: str | None = None
    # With params.logprobs: per output token, (its log-probability, [(id, log-probability) of the top alternatives]).
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    _prompt_hashes: tuple[list[int], frozenset[int]] | None = field(default=None, init=False, repr=False)
    penalty_history: "PenaltyHistory | None" = field(default=None, repr=False)  # made by its first penalized step
    bias_on_device: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # params.logit_bias there

    def __post_init__(self):
        self.token_ids = list(self.prompt_ids)
        self.num_prompt = len(self.prompt_ids)
        # Prompt positions of the image-context tokens: image row i fills position image_positions[i].
        self.image_positions = [p for p, t in enumerate(self.prompt_ids) if t == self.image_token_id] \
            if self.image_token_id >= 0 else []
        rows = 0 if self.image_embeds is None else self.image_embeds.shape[0]
        if len(self.image_positions) != rows:
            raise ValueError(f"prompt has {len(self.image_positions)} image-context tokens but {rows} embedding rows "
                             "were sent")
        if self.image_embeds is not None and not self.image_keys:  # no identity given: never shared
            self.image_keys = [(uuid.uuid4().hex, len(self.image_positions))]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    def __len__(self) -> int:
        """Its length as the scheduler and the KV cache see it: a pending token takes a position already."""
        return len(self.token_ids) + self.num_pending

    def image_rows(self, start: int, end: int) -> tuple[list[int], torch.Tensor | None]:
        """Prompt positions in [start, end) that take image rows, and those rows."""
        lo, hi = bisect_left(self.image_positions, start), bisect_left(self.image_positions, end)
        if lo == hi:
            return [], None
        return self.image_positions[lo:hi], self.image_embeds[lo:hi]

    def prompt_hashes(self, block_size: int) -> tuple[list[int], frozenset[int]]:
        """The prefix-cache hash of each full block of the prompt, chained as `BlockManager.register` chains them
        (in order, and as a set); worked out once."""
        if self._prompt_hashes is None:
            hashes, prev = [], 0
            for index in range(self.num_prompt // block_size):
                prev = hash(self.block_key(index, block_size, prev))
                hashes.append(prev)
            self._prompt_hashes = hashes, frozenset(hashes)
        return self._prompt_hashes

    def block_key(self, index: int, block_size: int, prev: int) -> tuple:
        """What fixes the K/V of a full block: the previous block's hash, its tokens, and for image-context tokens
        which rows of which image they hold (the token ids alone are the same for every image)."""
        start, end = index * block_size, (index + 1) * block_size
        tokens = tuple(self.token_ids[start:end])
        lo, hi = bisect_left(self.image_positions, start), bisect_left(self.image_positions, end)
        images, first = [], 0
        for key, rows in self.image_keys:
            if first < hi and first + rows > lo:
                images.append((key, max(lo, first) - first, min(hi, first + rows) - first))
            first += rows
        return prev, tokens, tuple(images)
