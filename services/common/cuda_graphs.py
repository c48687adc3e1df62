"""CUDA graph capture shared by both GPU services: batch-size buckets, recording into a shared memory pool, and the
arrival counters of split kernels (made before a capture)."""
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


_counters: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters, at least `count`, for kernels whose last program to reach an output tile finishes it
    (split-K GEMMs, split attention); one buffer per device for all of them: launches on one stream run in order and
    each leaves its counters at zero. A larger buffer is added when needed, the old ones kept: a captured CUDA graph
    may still point at them."""
    buffers = _counters.setdefault(device, [])
    if not buffers or buffers[-1].numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # zeroing would run only at replay
            raise RuntimeError("split kernels: run each shape once before capturing it in a CUDA graph")
        buffers.append(torch.zeros(max(count, 4096), dtype=torch.int32, device=device))
    return buffers[-1]
