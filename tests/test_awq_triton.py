"""The Triton W4A16 paths equal the dequantize path, the table's configs compile for H100/H200, and the dispatch
table is well formed. The kernels run in Triton's interpreter (CPU), in a process of their own
(tests/awq_triton_check.py); on a GPU the same checks run compiled (bench/awq.py)."""
import json
import os
import subprocess
import sys

import pytest

from services.common.kernel_tables import DEVICE_CLASSES
from services.llm_decoder.models import awq_triton as at
from tools.run_local import ROOT


def _check(case: str, **env) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    out = subprocess.run([sys.executable, "-m", "tests.awq_triton_check", case], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("case", ["paths", "table", "tune"])
def test_triton_paths_equal_dequantized_matmul(case):
    _check(case, TRITON_INTERPRET="1")


def test_table_configs_compile_for_h100_h200(tmp_path):
    _check("compile", TRITON_CACHE_DIR=str(tmp_path))  # a fresh cache: every kernel really compiles


def test_committed_table_is_well_formed():
    raw = json.loads(at.CONFIGS.read_text())
    assert "default" in raw
    for cls, entry in raw.items():
        assert cls == "default" or cls in DEVICE_CLASSES, cls
        assert entry["source"] and entry["shapes"], cls
    for cls, shapes in at.parse_table(raw).items():
        for n, k, configs in shapes:
            bounds = [c.max_m for c in configs]
            assert bounds[-1] is None and bounds[:-1] == sorted(set(bounds[:-1])), (cls, n, k, bounds)
            for c in configs:
                assert c.kernel in ("fused", "dense", "int4mm"), c
                if c.kernel == "fused":
                    bm, bn, bk = c.block
                    assert all(b & (b - 1) == 0 for b in c.block) and bn >= 16 and bk >= 16, c
                    assert bm == 1 or bm >= 16, c  # tl.dot needs 16 rows; one row is the GEMV
                    assert bm > 1 or c.max_m == 1, c  # a one-row tile for several tokens rereads the weights
                    assert c.split >= 1 and c.warps in (1, 2, 4, 8, 16) and c.stages >= 1, c


def test_select_takes_the_device_class_nearest_shape_and_bucket():
    def cfg(max_m, split):
        return at.Config(block=(16, 64, 64), split=split, max_m=max_m)

    table = {"default": [(2048, 2048, [cfg(16, 1), cfg(None, 2)])],
             "H100/H200": [(2048, 2048, [cfg(1, 3), cfg(64, 4), at.Config(kernel="dense")]),
                           (22016, 2048, [cfg(None, 5)])]}
    assert at.device_class("NVIDIA H100 80GB HBM3") == at.device_class("NVIDIA H200") == "H100/H200"
    assert at.device_class("NVIDIA A100-SXM4-80GB") == at.device_class("cpu") == "default"
    assert at.select(table, "NVIDIA A100-SXM4-80GB", 2560, 2048, 16).split == 1
    assert at.select(table, "NVIDIA A100-SXM4-80GB", 2560, 2048, 17).split == 2
    h200 = [at.select(table, "NVIDIA H200", 2560, 2048, m) for m in (1, 2, 64, 65, 4096)]
    assert [c.split for c in h200[:3]] == [3, 4, 4] and h200[3].kernel == h200[4].kernel == "dense"
    assert at.select(table, "NVIDIA H200", 11008, 2048, 1).split == 5  # nearer 22016 than 2048
    assert str(h200[0]) == "gemm+split3 16x64x64 w4 s3" and at.Config(block=(1, 64, 64)).path == "gemv"


def test_bench_smoke_runs_every_bucket_of_the_table(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "bench.awq", "--smoke", "--out", str(tmp_path / "awq.md")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "awq.json").read_text())["rows"]
    configs = at.shape_configs(at.parse_table(json.loads(at.CONFIGS.read_text())), "cpu", rows[0]["n"], rows[0]["k"])
    assert [r["config"] for r in rows] == [str(c) for c in configs]
    assert all(0 <= r["error_share"] <= 1 for r in rows)


def test_awq_configs_names_the_table_in_use(tmp_path):
    """$AWQ_CONFIGS (a table `bench.awq --tune` has just written) replaces the committed table, for serving too."""
    raw = {"default": {"source": "test", "shapes": [{"n": 2048, "k": 2048, "configs": [
        {"max_m": None, "kernel": "fused", "block": [16, 32, 32], "split": 7, "warps": 2, "stages": 2}]}]}}
    (tmp_path / "t.json").write_text(json.dumps(raw))
    code = ("from services.llm_decoder.models import awq_triton as at; "
            "print(at.table_path().name, at.pick_config('cpu', 2560, 2048, 1))")
    for env, want in ((str(tmp_path / "t.json"), "t.json gemm+split7 16x32x32 w2 s2"), ("", "awq_configs.json")):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "AWQ_CONFIGS": env})
        assert out.returncode == 0 and out.stdout.startswith(want), out.stdout + out.stderr[-2000:]


def test_timing_rotation_reads_each_copy_cold(monkeypatch):
    """bench.awq times calls cycling through copies of the weights that together exceed COLD_BYTES, so no call
    finds its weights in L2; each copy is a copy (its own storage, the same values)."""
    import torch

    from bench import awq as bench
    monkeypatch.setattr(bench, "COLD_BYTES", 10_000)
    w, s = torch.randn(40, 20), torch.randn(5)  # 3,220 bytes: 4 copies pass 10,000
    copies = bench.rotation((w, s))
    assert len(copies) == 4 and copies[0][0] is w
    assert len({c[0].data_ptr() for c in copies}) == 4 and all(torch.equal(c[0], w) and torch.equal(c[1], s)
                                                                 for c in copies)
    assert len(bench.rotation((torch.randn(4000, 20),))) == 2  # at least two, however large
    assert bench.rotation((w, s), cold=False) == [(w, s)]


def test_skinny_candidates_split_up_to_many_programs_per_sm():
    """A few tokens' candidates split K up to SKINNY_PROGRAMS_PER_SM programs per SM (gate_up_proj at one token has
    344 64-column tiles for an H200's 132 SMs), never into more parts than K has blocks; in-place ones take a program
    per group, by their design."""
    import torch

    from bench import awq as bench
    sms, k, n = 132, 2048, 22016
    for m in (1, 16):
        cands = bench.candidates(m, n, k, sms, torch.device("cuda"))
        assert [c for c in cands if c.kernel != "fused"] == [at.Config(kernel="int4mm")]  # torch's, up to 64 tokens
        cands = [c for c in cands if c.kernel == "fused"]
        assert any(c.in_place for c in cands) == (m == 1)
        assert {c.block for c in cands if c.unpack == "lanes"} == {b[:3] for b in bench.LANES[:1 if m == 1 else None]}
        for c in cands:
            programs = -(-n // c.block[1]) * -(-m // c.block[0])
            assert c.split <= k // min(c.block[2], bench.GROUP)
            if c.in_place:
                assert c.split == k // bench.GROUP
            else:
                assert c.split == 1 or programs * c.split <= bench.SKINNY_PROGRAMS_PER_SM * sms
        assert max(c.split for c in cands if c.block[1] == 64 and not c.in_place) == 4  # 344 x 4 programs, 10.4 per SM
    # torch's int4 kernel only where it takes the shape: group sizes 32-256 that divide K, N a multiple of 8 (CPU: 16).
    offered = {(n_, k_, dev): at.Config(kernel="int4mm") in bench.candidates(1, n_, k_, sms, torch.device(dev))
               for n_, k_, dev in ((2056, 2048, "cuda"), (2056, 2048, "cpu"), (2048, 2080, "cuda"))}
    assert offered == {(2056, 2048, "cuda"): True, (2056, 2048, "cpu"): False, (2048, 2080, "cuda"): False}
    assert at.Config(kernel="int4mm") not in bench.candidates(128, 2048, 2048, sms, torch.device("cuda"))


def test_layers_are_packed_for_torchs_int4_kernel_where_the_table_uses_it(monkeypatch):
    """uses_int4mm: whether any bucket of the (nearest) tuned shape of the device's class names torch's int4 kernel,
    which decides whether an AWQ layer also keeps its weight in that kernel's layout."""
    import torch

    from services.common import kernel_tables
    table = {"default": [(2048, 2048, [at.Config(kernel="int4mm", max_m=16), at.Config(kernel="dense")])],
             "H100/H200": [(2048, 2048, [at.Config(block=(1, 64, 64), max_m=1), at.Config(kernel="int4mm")]),
                           (22016, 2048, [at.Config(block=(16, 64, 64))])]}
    monkeypatch.setattr(at, "_table", lambda: table)
    gpu = {"cuda:0": "NVIDIA H200", "cuda:1": "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(kernel_tables, "device_name", lambda device: gpu[str(device)])
    assert at.uses_int4mm(torch.device("cuda:0"), 2560, 2048)
    assert not at.uses_int4mm(torch.device("cuda:0"), 11008, 2048)  # nearer 22016, whose buckets are all Triton's
    assert at.uses_int4mm(torch.device("cuda:1"), 22016, 2048)  # the default class
