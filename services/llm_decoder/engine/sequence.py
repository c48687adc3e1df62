"""A request inside the engine: its tokens, image embeddings, sampling settings and KV blocks."""
import enum
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: frozenset[int] = frozenset()
    seed: int | None = None


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
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0                         # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None    # per-request sampling RNG when a seed is given

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
