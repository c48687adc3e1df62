"""W4A16 GEMM over AWQ-packed weights in Triton: nibbles are unpacked in registers, so weights stream at 4 bits.

out[M, N] = x[M, K] @ W^T with W[n, k] = (q[k, n] - zero[k // group, n]) * scale[k // group, n], accumulated in fp32.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _awq_gemm(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, M, N, K, group_size,
              stride_xm, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Channel j of a packed word sits in nibble slot j // 2 + 4 * (j % 2) (AWQ's order 0, 2, 4, 6, 1, 3, 5, 7).
    shifts = ((offs_n % 8) // 2 + (offs_n % 2) * 4) * 4
    packed_n, mask_m, mask_n = offs_n // 8, offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_kn = mask_k[:, None] & mask_n[None, :]
        group = offs_k // group_size
        q = tl.load(qweight_ptr + offs_k[:, None] * (N // 8) + packed_n[None, :], mask=mask_kn, other=0)
        z = tl.load(qzeros_ptr + group[:, None] * (N // 8) + packed_n[None, :], mask=mask_kn, other=0)
        s = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=mask_kn, other=0.0)
        q = (q >> shifts[None, :]) & 0xF  # the mask drops the sign bits an arithmetic shift brings in
        z = (z >> shifts[None, :]) & 0xF
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)
        acc += tl.dot(x, w)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int) -> torch.Tensor:
    """x [..., K] (fp16/bf16) times the packed weight -> [..., N] in x's dtype."""
    k, n = qweight.shape[0], scales.shape[1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64  # decode batches are small: do not waste a 64-row tile on one token
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _awq_gemm[grid](x2, qweight, qzeros, scales, out, m, n, k, group_size, x2.stride(0), out.stride(0),
                    BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=min(64, group_size))
    return out.reshape(*x.shape[:-1], n)
