"""The AWQ W4A16 kernels' inner loops on sm_90 (H100/H200) without a GPU: instructions per loop iteration, and how
many of them convert between float formats or spill registers, for every fused config the committed table dispatches
and the tuning candidates for 1, 16 and 512 tokens, in fp16 and bf16; with --base, the same kernels at another
revision compiled in the same run (ratios base / now).

Each kernel is compiled by Triton and ptxas for sm_90 and disassembled by nvdisasm (both ship with Triton); a loop
is a backward branch, the K loop the longest. This is a static count, not a timing: it tells what a change does to
the work per weight where the unpacking bounds the kernel, and the GPU run (bench.awq) times it.

    python -m bench.sass [--base REV|FILE] [--out bench/results/sass-<date>.md]
    python -m bench.sass --smoke --base HEAD          # three configs
"""
import argparse
import collections
import datetime
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

from bench import kernel_report
from bench.awq import candidates
from services.common.kernel_tables import TRITON_OPTIONS
from services.llm_decoder.models import awq_triton as at
from tools.run_local import ROOT

KERNELS = "services/llm_decoder/models/awq_triton.py"
NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
CONVERSIONS = ("F2F", "F2FP")  # between float formats (the loop's I2F/F2I divide by the group size)
INTS = ("M", "N", "K", "group_size", "stride_xm", "stride_om")
FLAGS = {"slots": "SLOTS", "in-place": "IN_PLACE", "lanes": "LANES"}  # each unpacking's constexpr in _awq_gemm


def compile_for_sm90(fn, types: dict, constants: dict, aligned: tuple[str, ...] = (), **options):
    """`fn` compiled for sm_90 by Triton's compiler and ptxas, no GPU needed. `types`: Triton type of each runtime
    argument ("*bf16", "i32", ...); the others are `constants`. Pointers and the `aligned` integers are declared
    16-divisible, as the launcher finds them at the served shapes."""
    from triton import compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in types.items()
             if ty.startswith("*") or name in aligned}
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    return compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                   options={**TRITON_OPTIONS, **options})


def compile_awq(fn, cfg: at.Config, dtype: str, bias: bool, gated: bool = False):
    """The fused AWQ kernel `fn` for `cfg` with `dtype` ("fp16"/"bf16") activations and fp16 scales, as awq_gemm
    launches it (a revision whose kernel takes no bias, or no gated input, gets none)."""
    split, bias = cfg.split > 1, bias and "b_ptr" in fn.arg_names
    types = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "qz_ptr": "*i32", "sc_ptr": "*fp16", "out_ptr": f"*{dtype}",
             **({"b_ptr": "*fp16"} if bias else {}), **({"ws_ptr": "*fp32", "count_ptr": "*i32"} if split else {}),
             **{name: "i32" for name in INTS}}
    constants = {**({} if split else {"ws_ptr": None, "count_ptr": None}),
                 "BLOCK_M": cfg.block[0], "BLOCK_N": cfg.block[1], "BLOCK_K": cfg.block[2], "STAGES": cfg.stages,
                 **{flag: cfg.unpack == unpack for unpack, flag in FLAGS.items() if flag in fn.arg_names}}
    if "SPLIT_K" in fn.arg_names:  # revisions before the split became a runtime argument
        constants["SPLIT_K"] = cfg.split
    else:
        types["split_k"], constants["SPLIT"] = "i32", split
    if "nibble_mask" in fn.arg_names:
        types["nibble_mask"] = "i32"
    if "HAS_BIAS" in fn.arg_names:
        constants |= {"HAS_BIAS": bias, **({} if bias else {"b_ptr": None})}
    if "GATED" in fn.arg_names:
        constants["GATED"] = gated
    return compile_for_sm90(fn, types, constants, INTS[1:], num_warps=cfg.warps)


def loop_counts(cubin: bytes) -> collections.Counter:
    """Instructions (by opcode) of the kernel's K loop in its SASS: the longest loop with a tensor-core instruction,
    else the longest (a split tile's merge of the partials is a loop too, longer than a prefill tile's K loop)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(NVDISASM), "-c", f.name], capture_output=True, text=True, check=True).stdout
    lines = sass.splitlines()
    labels = {m[1]: i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    best = collections.Counter()
    for i, line in enumerate(lines):
        target = re.search(r"\bBRA\s+`?\(?(\.L_x_\d+)", line)
        if target and labels.get(target[1], i) < i:
            ops = collections.Counter(m[2].split(".")[0] for body in lines[labels[target[1]]:i + 1]
                                      if (m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)",
                                                        body)))
            best = max(best, ops, key=lambda c: (bool(c["HMMA"] or c["HGMMA"]), sum(c.values())))
    return best


def kernels_at(base: str):
    """_awq_gemm of the awq_triton.py at git revision `base`, or in the file `base` names."""
    if Path(base).is_file():
        source = Path(base).read_text()
    else:
        source = subprocess.run(["git", "show", f"{base}:{KERNELS}"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="sass-base-")) / "awq_triton_base.py"
    path.write_text(source)  # a file: Triton reads the kernels' source back
    spec = importlib.util.spec_from_file_location("awq_triton_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._awq_gemm


def configs(smoke: bool) -> list[at.Config]:
    if smoke:
        return [at.Config(block=(1, 128, 64), split=8), at.Config(block=(16, 64, 128), split=2),
                at.Config(block=(1, 128, 64), split=16, stages=1, unpack="in-place")]
    table = [c for shapes in at._table().values() for _, _, cs in shapes for c in cs if c.kernel == "fused"]
    untuned = [c for m in (1, 16, 512) for c in candidates(m, 2560, 2048, 132, torch.device("cuda"))
               if c.kernel == "fused"]
    return list({c.compiled: c for c in table + untuned}.values())  # each kernel once


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="a git revision (or an awq_triton.py file) whose kernels to compile beside the "
                   "current ones")
    p.add_argument("--smoke", action="store_true", help="three configs")
    p.add_argument("--out", type=Path, help="markdown report (the JSON beside it)")
    args = p.parse_args()
    base = kernels_at(args.base) if args.base else None
    rows = []
    report = ["| config | dtype | loop instructions | a weight | conversions | spills | base loop | base conversions "
              "| base spills | base / now |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cfg in configs(args.smoke):
        for dtype in ("fp16", "bf16"):
            now = loop_counts(compile_awq(at._awq_gemm, cfg, dtype, bias=dtype == "fp16").asm["cubin"])
            # A thread's share of the iteration's BLOCK_N x BLOCK_K weights (each unpacked once, whatever BLOCK_M).
            weights = cfg.block[1] * cfg.block[2] / (32 * cfg.warps)
            row = {"config": str(cfg), "dtype": dtype, "loop": sum(now.values()),
                   "per_weight": round(sum(now.values()) / weights, 2),
                   "conversions": sum(now[op] for op in CONVERSIONS), "spills": now["LDL"] + now["STL"]}
            flag = FLAGS.get(cfg.unpack)  # None: interleaved, in every revision
            if base and (flag is None or flag in base.arg_names):  # else: no such kernel there
                then = loop_counts(compile_awq(base, cfg, dtype, bias=dtype == "fp16").asm["cubin"])
                row |= {"base_loop": sum(then.values()), "base_conversions": sum(then[op] for op in CONVERSIONS),
                        "base_spills": then["LDL"] + then["STL"]}
            rows.append(row)
            tail = (f"{row['base_loop']} | {row['base_conversions']} | {row['base_spills']} | "
                    f"{row['base_loop'] / row['loop']:.2f}" if "base_loop" in row else "- | - | - | -")
            report.append(f"| {cfg} | {dtype} | {row['loop']} | {row['per_weight']:.2f} | {row['conversions']} | "
                          f"{row['spills']} | {tail} |")
            print(report[-1], flush=True)
    header = (f"# AWQ kernel loops on sm_90 (static)\n\ndate: {datetime.date.today()}; triton {triton.__version__}, "
              f"torch {torch.__version__}; command: `python -m bench.sass {' '.join(sys.argv[1:])}`"
              + (f"; base: {args.base}" if args.base else "") + "\n\nInstructions of the K loop (one iteration) and "
              "the float-format conversions among them; a weight: the loop's instructions over a thread's share of the "
              "iteration's weights; spills: its local-memory loads and stores (registers ran out); fp16 with a bias, "
              "bf16 without.\n\n")
    kernel_report(args.out, header + "\n".join(report) + "\n", {"base": args.base, "rows": rows}, [])


if __name__ == "__main__":
    main()
