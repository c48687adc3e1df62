"""AWQ W4A16 on the GPU: the Triton kernel against dense fp16 and against the dequantize-per-call path.

Shapes are the linears of Qwen2.5-3B (the LLM of InternVL2_5-4B-AWQ), group 128, random weights. For each shape and
token count it checks the kernel against the dequantize path and prints times and ratios against dense fp16 measured
in the same run.

    python -m bench.awq [--out bench/results/awq-<date>.md]          # on a CUDA machine
    TRITON_INTERPRET=1 python -m bench.awq --smoke                   # CPU: correctness only, tiny shapes
"""
import argparse
import datetime
import sys

import torch
import torch.nn.functional as F

from services.llm_decoder.models import awq
from services.llm_decoder.models.awq_triton import awq_gemm

# (name, in_features K, out_features N) of one Qwen2.5-3B decoder layer, q/k/v and gate/up fused as served.
SHAPES = [("qkv_proj", 2048, 2560), ("o_proj", 2048, 2048), ("gate_up_proj", 2048, 22016), ("down_proj", 11008, 2048)]
TOKENS = [1, 16, 64, 512]
GROUP = 128


def timed(fn, repeat: int = 50) -> float:
    """Median milliseconds of `fn` on the GPU."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter), no timing")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    shapes = [("tiny", 256, 192)] if args.smoke else SHAPES
    tokens = [1, 17] if args.smoke else TOKENS
    torch.manual_seed(0)
    rows = ["| linear | K | N | tokens | max abs diff vs dequantize | dense fp16 ms | triton ms | dequantize+matmul ms "
            "| dense / triton |", "|---|---|---|---|---|---|---|---|---|"]
    for name, k, n in shapes:
        w = torch.randn(n, k, device=device) * 0.02
        q = {key: t.to(device) for key, t in awq.quantize(w, GROUP).items()}
        dense = awq.dequantize(q["qweight"], q["qzeros"], q["scales"], GROUP, torch.float16)
        for m in tokens:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            got = awq_gemm(x, q["qweight"], q["qzeros"], q["scales"], GROUP)
            want = F.linear(x.float(), dense.float())
            diff = (got.float() - want).abs().max().item()
            assert torch.allclose(got.float(), want, rtol=2e-3, atol=2e-3), f"{name} m={m}: max diff {diff}"
            if args.smoke:
                rows.append(f"| {name} | {k} | {n} | {m} | {diff:.2e} | - | - | - | - |")
                continue
            t_dense = timed(lambda: F.linear(x, dense))
            t_triton = timed(lambda: awq_gemm(x, q["qweight"], q["qzeros"], q["scales"], GROUP))
            t_deq = timed(lambda: F.linear(x, awq.dequantize(q["qweight"], q["qzeros"], q["scales"], GROUP,
                                                              torch.float16)))
            rows.append(f"| {name} | {k} | {n} | {m} | {diff:.2e} | {t_dense:.3f} | {t_triton:.3f} | {t_deq:.3f} "
                        f"| {t_dense / t_triton:.2f} |")
    device_name = "CPU (Triton interpreter, smoke)" if args.smoke else torch.cuda.get_device_name()
    header = (f"# AWQ W4A16 GEMM\n\ndevice: {device_name}; date: {datetime.date.today()}; torch {torch.__version__}; "
              f"command: `python -m bench.awq {' '.join(sys.argv[1:])}`\n\n")
    report = header + "\n".join(rows) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
