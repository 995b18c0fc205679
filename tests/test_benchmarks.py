"""Smoke test of the benchmark suite: ``benchmarks/run.py --quick`` on a tiny random model writes a table with
every case, a PNG plot, and keeps what is written around its generated section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_cases import CASES  # noqa: E402

from traitlens.methods import METHODS  # noqa: E402


def test_quick_run_writes_every_row(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text(
        "# hand-written intro\n\nkept\n\n<!-- BEGIN GENERATED: cpu -->\nOLD-GENERATED-TEXT\n<!-- END GENERATED: cpu -->\n"
        "\n<!-- BEGIN GENERATED: cuda -->\nGPU part unmeasured\n<!-- END GENERATED: cuda -->\n"
    )
    raw = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--out",
            str(out),
            "--json",
            str(raw),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# hand-written intro\n\nkept\n")
    assert "OLD-GENERATED-TEXT" not in text.split("<!-- BEGIN GENERATED: cpu -->")[1].split("<!-- END")[0]
    assert "GPU part unmeasured" in text  # the other section is left alone
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for case in CASES:
        matching = [r for r in rows if r.startswith(f"| {case.label} |")]
        assert len(matching) == 1, case.label
        cells = [c.strip() for c in matching[0].strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0 and float(cells[3]) > 0  # ms, ratios
        assert float(cells[6]) >= 0  # peak memory was measured
    for method in METHODS:
        assert any(r.startswith(f"| {method} | defaults |") for r in rows), method
    assert any(r.startswith("| probe | solver='sklearn' |") for r in rows)
    assert any(r.startswith("| stream | 40 |") for r in rows)
    assert "AMD" in text or "Intel" in text or "CPU:" in text
    assert (tmp_path / "benchmarks_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(raw.read_text())
    times = results["models"][0]["times"]
    bare = times["bare"]
    assert len(bare) == 2 and all(t > 0 for t in bare)
    # the ratio of minima, from the raw times
    row = next(r for r in rows if r.startswith(f"| {CASES[2].label} |"))
    assert row.split("|")[4].strip() == f"{min(times[CASES[2].key]) / min(bare):.3f}"
    # on the CPU every batch is timed with every case: 2 rounds x 2 forward (1 generate) batches, and the
    # paired ratio is the median of the per-batch ratios, the number the targets are judged on
    batches = results["models"][0]["batch_times"]
    assert len(batches["bare"]) == 4 and len(batches["gen_plain"]) == 2
    for key, got in zip(("tl_device", "tl_stop"), (CASES[5], CASES[8]), strict=True):
        assert got.key == key
        pairs = sorted(x / b for x, b in zip(batches[key], batches["bare"], strict=True))
        row = next(r for r in rows if r.startswith(f"| {got.label} |"))
        paired, interval = row.split("|")[6].split()
        assert float(paired) == round((pairs[1] + pairs[2]) / 2, 3)
        low, high = map(float, interval.strip("()").split("-"))
        assert pairs[0] - 1e-3 <= low <= float(paired) <= high <= pairs[-1] + 1e-3
    judged = [r for r in rows if r.startswith(f"| tiny | {CASES[8].label} |")]  # the Targets table
    assert judged and all(f"| {float(paired):.3f} |" in r for r in judged)


def test_host_profile_runs_on_the_cpu():
    """The GPU run's host-time diagnostic, run as a script (as gpu.sh runs it: a version without its
    ``__main__`` block once printed nothing there) on the CPU, so that it cannot waste a GPU session."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "host_profile.py"),
            *("--device", "cpu", "--model", "tiny", "--new-tokens", "2", "--rows", "3", "--rounds", "1"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for key in ("bare", "tl_cpu", "tl_last", "gen_plain", "gen_tl"):
        assert f"== {key}: " in out
    assert out.count("cudaStreamSynchronize") == 1  # the table of runtime calls
    generate, forward = out.split("\ngenerate (2 new tokens): ")[1].split("\nforward: ")
    assert "no-op hooks on every layer" in forward and "tl_cpu, all in stream order" in forward
    assert "tl_last, kept on the GPU (no copy)" in forward
    assert "generate, no-op hooks on every layer" in generate and "gen_tl, joined into new memory" in generate


def test_gpu_check_runs_on_the_cpu():
    """The GPU run's correctness check, run as gpu.sh runs it but on the CPU (one batch in flight), so that
    a broken script cannot waste a GPU session; on the CPU its comparisons hold too."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--batches", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    oks = [line for line in proc.stdout.splitlines() if line.startswith("  ok: ")]
    assert len(oks) == 6, proc.stdout
    assert "3 passes joined along batch" in oks[-1]
