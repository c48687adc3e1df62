"""CUDA graph capture shared by both GPU services: batch-size buckets and recording into a shared memory pool."""
import torch


def bucket_sizes(largest: int) -> list[int]:
    """The batch sizes to capture: powers of two up to 8, then steps of 16, and `largest` itself."""
    return sorted({s for s in (1, 2, 4, 8, *range(16, largest, 16)) if s < largest} | {largest})


def record(forward, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run `forward` once outside the capture (it compiles kernels and settles the allocator), then capture it;
    captures made largest first can share one `pool` (the graphs never run at the same time). Autograd is the
    caller's to turn off."""
    forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool):
        out = forward()
    return graph, out
