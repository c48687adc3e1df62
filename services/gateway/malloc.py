"""glibc's allocator, set up one way for the gateway process and the other for its preprocessing workers.

The gateway holds request bodies and decoded data only while a request needs them, and must stay within what
MAX_DECODE_PIXELS bounds: its large blocks go back to the kernel when freed. A worker handles one image after
another: its large blocks are kept for the next one. Both no-ops where the C library is not glibc (musl, macOS).
"""
import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


def _mallopt(param: int, value: int) -> None:
    if (mallopt := getattr(ctypes.CDLL(None), "mallopt", None)) is not None:
        mallopt(param, value)


def return_large_buffers() -> None:
    """The gateway: blocks of 1 MiB and more from mmap, so each goes back to the OS when freed. glibc raises its mmap
    threshold as large blocks are freed, after which they come from per-thread heaps that keep them: RSS then grows
    past what MAX_DECODE_PIXELS bounds (3x in tests/test_memory.py)."""
    _mallopt(M_MMAP_THRESHOLD, 1 << 20)  # fixed: no longer raised


def reuse_freed_memory() -> None:
    """A preprocessing worker: freed arrays kept on the heap for the next image. By default glibc gives each freed
    block of a few MB back to the kernel, so every image's arrays (decoded pixels, resize passes, tiles) fault their
    pages in afresh: measured (bench.preprocess, a 2-CPU VM) ~45 -> ~34 ms of CPU per 1920x1080 JPEG. Blocks under
    32 MB now come from the heap, which keeps up to 64 MB free."""
    _mallopt(M_MMAP_THRESHOLD, 32 << 20)
    _mallopt(M_TRIM_THRESHOLD, 64 << 20)
