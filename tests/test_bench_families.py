"""bench.families on the CPU at tiny shapes: the whole stack's time to first token on a miss and a hit, its split, and
the in-process baseline it is held against (the ViT over the same tiles, the engine's prefill of as long a prompt)."""
import subprocess
import sys

from tools.run_local import ROOT


def test_families_prints_the_split_and_the_ratios_to_the_baseline(tmp_path):
    out = tmp_path / "families.md"
    proc = subprocess.run([sys.executable, "-m", "bench.families", "--size", "tiny", "--device", "cpu", "--families",
                           "internvl2_5", "--max-tokens", "2", "--image", "448", "448", "--max-num", "2", "--workdir",
                           str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    lines = [line for line in out.read_text().splitlines() if line.startswith("|")]
    row = dict(zip((c.strip() for c in lines[0].strip("|").split("|")),
                   (c.strip() for c in lines[2].strip("|").split("|"))))
    assert "error" not in row, row
    assert {"vision", "store", "read", "decoder"} <= set(row["TTFT split ms"].split()[::2]), row
    vit, prefill, ttft, hit = (float(row[k]) for k in ("ViT alone ms", "prefill alone ms", "TTFT ms",
                                                       "cache-hit TTFT ms"))
    assert vit > 0 and prefill > 0
    ratio = float(row["TTFT / (ViT + prefill)"])
    assert abs(ratio - ttft / (vit + prefill)) <= 0.1 * ratio  # from the cells, rounded to whole milliseconds
    assert abs(float(row["cache-hit TTFT - prefill ms"]) - (hit - prefill)) <= 1
    assert not (tmp_path / "work" / "internvl2_5-original").exists()  # the checkpoint is deleted after its run
