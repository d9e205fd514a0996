"""Smoke tests of the benchmarks: they run, print a table and give finite numbers (no speed assertions)."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import _harness as H  # noqa: E402


def _run(args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r.stdout


def test_bench_fake_quant_lsq_quick(tmp_path):
    out_json = tmp_path / "lsq.json"
    # One thread: on a loaded machine a 2-thread parallel region can wait a whole
    # scheduler slice for its second thread, which only makes the smoke test slow.
    stdout = _run(["benchmarks.bench_fake_quant_lsq", "--quick", "--no-plot", "--threads", "1",
                   "--json", str(out_json)])
    assert "| case" in stdout and "| impl" in stdout and "ours speedup" in stdout, stdout
    assert "copy bandwidth" in stdout
    doc = json.loads(out_json.read_text())
    assert math.isfinite(doc["meta"]["copy_gbps"]) and doc["meta"]["copy_gbps"] > 0
    rows = doc["rows"]
    impls = {r["impl"] for r in rows}
    assert {"quantkern", "torch-learnable", "composite"} <= impls
    assert {(r["case"], r["pass"]) for r in rows} == {
        (c, p) for c in ("per-tensor", "per-channel") for p in ("fwd", "bwd", "fwd+bwd")
    }
    for r in rows:  # fp32: every implementation runs every pass
        for k in ("ms", "gbps", "roofline", "ours_x"):
            assert r[k] is not None and math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert "!= ours" not in r["note"], r  # all impls agree on the forward
    # the page-fault table (ours with and without the host output cache)
    pf = doc["page_faults"]
    assert len(pf) == 6 and all(math.isfinite(r["no_cache_ms"]) and r["no_cache_ms"] > 0 for r in pf)
    assert "page faults" in stdout


@pytest.mark.parametrize("name", ["hqq", "oscillation"])
def test_bench_quick_takes_the_common_options(name):
    # python -m benchmarks --quick passes the common options to every benchmark
    stdout = _run([f"benchmarks.bench_{name}", "--quick", "--no-plot", "--threads", "1", "--warmup", "1"])
    assert ("quantkern hqq_quantize" in stdout) if name == "hqq" else ("update (track only)" in stdout), stdout


def test_benchmarks_main_lists_benches():
    names = _run(["benchmarks", "--list"], timeout=60).split()
    assert "fake_quant_lsq" in names


def test_measure_and_table():
    t = H.measure(lambda: sum(range(1000)), warmup=1, reps=5)
    assert t.reps == 5 and 0 < t.min <= t.median <= t.max
    rows = [H.Row.from_timing("c", "a", "fwd", t, bytes=1e6), H.Row("c", "b", "fwd", note="failed")]
    rows[0].extra["ours_x"] = 1.0
    text = H.format_table(rows, ["case", "impl", "pass", "ms", "gbps", "ours_x", "note"])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| case") and "1.00x" in lines[2] and "n/a" in lines[3]
    assert len({len(l) for l in lines}) == 1  # aligned


def test_memory_bytes_above_the_last_level_cache():
    llc = H.llc_bytes()
    assert llc >= 0
    assert H.memory_bytes(1) >= max(H.MiB, 2 * llc)
    assert H.memory_bytes(1 << 16) == max(1 << 36, 2 * llc)


def test_save_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [H.Row("c", impl, p, ms=v) for impl, v in (("a", 1.0), ("b", 2.0)) for p in ("fwd", "bwd")]
    path = H.save_plot(rows, str(tmp_path / "p.png"))
    assert path and os.path.getsize(path) > 1000


def test_bench_calibrate_quick():
    stdout = _run(["benchmarks.bench_calibrate", "--quick", "--no-plot", "--no-loop", "--threads", "1", "--reps", "1"])
    assert "| case" in stdout and "torch-batched (previous)" in stdout and "entropy asym" in stdout, stdout
    assert "amax differs" not in stdout, stdout


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.mark.skipif(not {"avx512_vnni", "avx512vbmi"} <= _cpu_flags(), reason="needs AVX-512 VNNI and VBMI")
@pytest.mark.parametrize("bits, n_rows", [(4, 5), (2, 3)])  # kernel + 2 bare reads; int4: + 2 int4-only streams
def test_packed_linear_stream_harness_builds_and_runs(tmp_path, bits, n_rows):
    """benchmarks/packed_linear_stream/ (the out-of-torch GEMV A/B harness) still builds against
    the kernel headers and runs; a tiny hot weight, no timing checked. With AMX the AMX-int8
    GEMV experiment runs too and must give the kernel's output."""
    amx = "amx_int8" in _cpu_flags()
    env = dict(os.environ, OUT=str(tmp_path), HOT="1", K="512", N="64", R="2", AMX_GEMV=str(int(amx)))
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "packed_linear_stream", "run.sh"), str(bits)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if " ms (p25 " in ln]
    assert len(lines) == n_rows + amx and "kernel0.so" in lines[0], r.stdout
    assert all("same output as the first" in ln for ln in lines[:1 + amx]), r.stdout
