"""Next-token choice per sequence: greedy at temperature 0, else temperature + top-p with an optional seed."""
import torch

from services.llm_decoder.engine.sequence import Sequence


# Below this a temperature is greedy: dividing by it would overflow float32 logits.
MIN_TEMPERATURE = 1e-5


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [n, vocab] float32, one row per sequence."""
    out = logits.argmax(dim=-1).tolist()  # one transfer for every greedy row
    for i, (row, seq) in enumerate(zip(logits, seqs)):
        p = seq.params
        if p.temperature < MIN_TEMPERATURE:
            continue
        probs = torch.softmax(row / p.temperature, dim=-1)
        if 0 < p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(0) - sorted_probs > p.top_p
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(drop, 0))
        out[i] = int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))
    return out
