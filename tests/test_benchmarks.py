"""Smoke tests of the benchmarks: they run, print a table and give finite numbers (no speed assertions)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import _harness as H  # noqa: E402


def _run_proc(args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def _run(args, timeout=120):
    return _run_proc(args, timeout).stdout


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
    # python -m benchmarks --quick passes the common options to every benchmark; these two write no
    # JSON, and with --json - their table goes to stderr so that stdout stays clean
    r = _run_proc([f"benchmarks.bench_{name}", "--quick", "--no-plot", "--threads", "1", "--warmup", "1", "--json", "-"])
    assert r.stdout == "", r.stdout
    assert "writes no JSON" in r.stderr
    assert ("quantkern hqq_quantize" in r.stderr) if name == "hqq" else ("update (track only)" in r.stderr), r.stderr


def test_bench_quantize_quick():
    # cached block inputs against rerunning the model: both columns timed, the packed models identical
    out = _run(["benchmarks.bench_quantize", "--quick", "--threads", "1", "--reps", "1"], timeout=300)
    rows = [line for line in out.splitlines() if line.startswith("| 2 |") or line.startswith("| 4 |")]
    assert len(rows) == 2 and all(r.rstrip().endswith("| yes |") for r in rows), out
    eff = _run(["benchmarks.bench_quantize", "--quick", "--effnet", "--threads", "1", "--reps", "1"], timeout=300)
    assert "not installed" in eff or "| gptq |" in eff and "| yes |" in eff, eff


def test_bench_qat_convert_quick():
    # the QAT layer, its packed form and the float layer, each timed, for every M and dtype
    out = _run(["benchmarks.bench_qat_convert", "--quick", "--threads", "1", "--m", "1,3"], timeout=120)
    rows = [line for line in out.splitlines() if line.startswith("| 512x512 |")]
    assert len(rows) == 2 * 2 * 3, out
    assert sum("packed (convert_qat)" in r for r in rows) == 4, out


def test_bench_llm_decode_quick():
    # a tiny Llama: every variant runs prefill and cached decoding; aten's int4 kernel on our 4-bit
    # codes gives our int4 model's logits (the same weights), and the error grows as bits fall
    pytest.importorskip("transformers")
    r = _run_proc(["benchmarks.bench_llm_decode", "--quick", "--threads", "1", "--json", "-"], timeout=300)
    doc = json.loads(r.stdout)
    rows = {(x["impl"], x["pass"]): x for x in doc["rows"]}
    impls = {i for i, _ in rows}
    assert {"bf16 nn.Linear", "fp32 nn.Linear", "quantkern int4 g64", "quantkern int3 g64", "quantkern int2 g64",
            "dynamic int8"} <= impls, impls
    for x in doc["rows"]:
        for k in ("ms", "tok_s", "weight_mb", "logit_err", "vs_bf16_x"):
            assert math.isfinite(x[k]) and x[k] >= 0, (k, x)
    err = {i: rows[(i, "decode")]["logit_err"] for i in impls}
    assert err["fp32 nn.Linear"] == 0 and err["quantkern int4 g64"] < err["quantkern int3 g64"] < err["quantkern int2 g64"]
    if "aten int4 g64" in impls:
        assert abs(err["aten int4 g64"] - err["quantkern int4 g64"]) < 0.01 * err["quantkern int4 g64"]
        assert rows[("aten int4 g64", "decode")]["weight_mb"] > 0
    mb = {i: rows[(i, "decode")]["weight_mb"] for i in impls}
    assert mb["quantkern int2 g64"] < mb["quantkern int3 g64"] < mb["quantkern int4 g64"] < mb["bf16 nn.Linear"]
    assert "tokens/s" in r.stderr


def test_bench_llm_decode_bad_args(capsys):
    m = _bench("llm_decode")
    for argv, msg in ((["--group", "48"], "multiple of 32"), (["--quick", "--group", "128"], "must divide --ffn"),
                      (["--heads", "3"], "multiple of --heads"), (["--bits", "5"], "'5' is not one of"),
                      (["--device", "cuda"], "CPU only")):
        with pytest.raises(SystemExit) as e:
            m.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err, (argv, err)


def test_benchmarks_main_lists_benches():
    names = _run(["benchmarks", "--list"], timeout=60).split()
    assert "fake_quant_lsq" in names


def test_benchmarks_main_only_needs_names(capsys):
    from benchmarks.__main__ import main

    # an empty --only ran every benchmark at full size, and "--only ," ran none and exited 0
    for argv in (["--only"], ["--only", ""], ["--only", ","], ["--only=,"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--only needs benchmark name(s)" in err and "fake_quant_lsq" in err, (argv, err)


def test_runner_json_stdout_and_calibrate_options(tmp_path):
    """--json - through the runner: stdout is the JSON alone (the runner's ## lines go to stderr).
    bench_calibrate: explicit sizes win over --quick, and --plot writes its PNG."""
    png = tmp_path / "cal.png"
    r = _run_proc(["benchmarks", "--only", "calibrate", "--quick", "--tokens", "128", "--k", "512", "--n", "8",
                   "--legacy-channels", "4", "--no-loop", "--reps", "1", "--threads", "1", "--json", "-",
                   "--plot", str(png)])
    doc = json.loads(r.stdout)
    assert "## bench_calibrate" in r.stderr
    cases = {row["case"] for row in doc["rows"]}
    assert cases == {"act [128x512] per tensor", "weight [8x512] per channel"}, cases
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert png.stat().st_size > 1000 and "plot:" in r.stderr


def _bench(name):
    import importlib

    return importlib.import_module(f"benchmarks.bench_{name}")


# (benchmark, entry point, argv, text of the one-line error): each must stop at parse time, exit 2
BAD_ARGS = [
    ("oscillation", "main", ["--threads", "0"], "--threads: must be >= 1"),
    ("hqq", "main", ["--threads", "0"], "--threads: must be >= 1"),
    ("hqq", "main", ["--threads", "-1"], "--threads: must be >= 1"),
    ("hqq", "main", ["--warmup", "-1"], "--warmup: must be >= 0"),
    ("hqq", "main", ["--bits", "9"], "--bits: '9' is not one of"),
    ("packed_linear", "main", ["--quick", "--device", "gpu0"], "--device: 'gpu0' is not a benchmark device"),
    ("hqq", "main", ["--axis", "2"], "--axis: '2' is not one of"),
    ("hqq", "main", ["--quick", "--group", "48"], "--group 48 must divide"),
    ("calibrate", "main", ["--loop-channels", "0"], "--loop-channels: must be >= 1"),
    ("calibrate", "main", ["--tokens", "0"], "--tokens: must be >= 1"),
    ("calibrate", "main", ["--n", "0"], "--n: must be >= 1"),
    ("oscillation", "main", ["--sizes", "1000"], "a multiple of 1024"),
    ("oscillation", "main", ["--sizes", "1536"], "a multiple of 1024"),
    ("oscillation", "main", ["--sizes", "256K,,4G"], "'4G': expected N, NK or NM"),
    ("oscillation", "main", ["--sizes", ","], "at least one value"),
    ("packed_linear", "parse_args", ["--shapes", "4096x"], "expected KxN"),
    ("packed_linear", "parse_args", ["--shapes", "256"], "expected KxN"),
    ("packed_linear", "parse_args", ["--m", "-1"], "--m: must be >= 1"),
    ("packed_linear", "parse_args", ["--m", "0"], "--m: must be >= 1"),
    ("packed_linear", "parse_args", ["--bits", "5"], "'5' is not one of 4, 3, 2"),
    ("packed_linear", "parse_args", ["--groups", "0"], "--groups: must be >= 1"),
    ("packed_linear", "parse_args", ["--groups", "48"], "--groups 48 does not fit shape"),
    # a default group size that does not fit --shapes: the message says it is the default (not typed by the user)
    ("packed_linear", "parse_args", ["--shapes", "64x64"], "--groups 128 (the default; pass --groups) does not fit"),
    ("packed_linear", "parse_args", ["--dtype", "fp8"], "'fp8' is not one of"),
    ("packed_linear", "parse_args", ["--x", "cauchy"], "invalid choice: 'cauchy'"),
    ("fake_quant_lsq", "parse_args", ["--bw-mib", "-5"], "--bw-mib: must be >= 1"),
    ("fake_quant_lsq", "parse_args", ["--pool-mib", "-1"], "--pool-mib: must be >= 0"),
    ("fake_quant_lsq", "parse_args", ["--pass", ","], "at least one value"),
    ("fake_quant_lsq", "parse_args", ["--case", ","], "at least one value"),
    ("fake_quant_lsq", "parse_args", ["--case", "per-row"], "'per-row' is not one of"),
    ("fake_quant_lsq", "parse_args", ["--impl", "nope"], "'nope' is not one of"),
    ("fake_quant_lsq", "parse_args", ["--reps", "0"], "--reps: must be >= 1"),
    # a meta device timed no work: a table of made-up numbers, exit 0
    ("packed_linear", "parse_args", ["--device", "meta"], "'meta' is not a benchmark device"),
    ("fake_quant_lsq", "parse_args", ["--device", "cpu:1"], "'cpu:1' is not a benchmark device"),
    # --effnet's rows are fixed: the LLM options were ignored
    ("quantize", "main", ["--effnet", "--bits", "2"], "--bits: not with --effnet"),
    ("quantize", "main", ["--crops", "3"], "--crops: only with --effnet"),
    # a group that does not divide the MLP's 352 inputs was labelled g128 while those layers used g32
    ("quantize", "main", ["--quick", "--group", "128"], "divides the hidden size 128 and the intermediate size 352"),
    ("hqq", "main", ["--minilm", "--group", "100"], "must divide MiniLM's in_features 384 and 1536"),
]


@pytest.mark.parametrize("name, entry, argv, msg", BAD_ARGS, ids=[f"{b[0]} {' '.join(b[2])}" for b in BAD_ARGS])
def test_bench_bad_args_are_usage_errors(name, entry, argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        getattr(_bench(name), entry)(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err, err


def test_cold_pool_touches_the_whole_pool_between_two_uses_of_a_copy():
    pl = _bench("packed_linear")
    for nbytes, pool in ((4, 10), (6, 10), (5, 10), (20, 10)):
        p = pl.Pool(lambda: (0,), nbytes, pool)
        assert (p.n - 1) * nbytes >= pool and p.n >= 2
        n = H.cold_copies(nbytes, pool)  # (every benchmark's rotation: fake_quant_lsq, oscillation)
        assert n == p.n and (n - 1) * nbytes >= pool
    # the benchmarks size their rotations with it, not with a rule of their own
    for name in ("fake_quant_lsq", "oscillation", "packed_linear"):
        src = open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"bench_{name}.py")).read()
        assert "cold_copies(" in src and "-(-pool" not in src and "-(-args.pool" not in src, name


def test_bench_arg_lists_parse():
    a = _bench("packed_linear").parse_args(["--shapes", "256x512,", "--m", "1,8", "--bits", "2,4", "--groups", "256",
                                            "--dtype", "float32"])
    assert (a.shapes, a.m, a.bits, a.groups, a.dtype) == ([(256, 512)], [1, 8], [2, 4], [256], ["float32"])
    q = _bench("packed_linear").parse_args(["--quick"])
    assert (q.shapes, q.m, q.bits, q.groups, q.dtype, q.x) == ([(768, 3072), (4096, 11008)], [1, 32], [4], [64],
                                                               ["bfloat16"], "gaussian")
    x = _bench("packed_linear").make_x(3, 2048, torch.Generator().manual_seed(0), "outliers")
    assert (x[:, 7::1024].abs().mean() > 10 * x.abs().mean()) and x.shape == (3, 2048)
    f = _bench("fake_quant_lsq").parse_args(["--pass", "bwd,fwd", "--impl", "composite"])
    assert (f.passes, f.case, f.impl) == (["bwd", "fwd"], ["per-tensor", "per-channel"], ["composite"])
    osc = _bench("oscillation")
    assert [osc.parse_size(s) for s in ("1024", "256K", "1.5M")] == [1024, 256 << 10, 3 << 19]


def test_bench_help_says_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        _bench("hqq").main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 2)" in out and "(default 1)" in out  # threads, warmup
    assert "ignored: this benchmark writes no JSON" in out and "ignored: this benchmark writes no plot" in out
    assert "ignores --n, --k, --axis, --dist" in out


def test_oscillation_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is available"):
        _bench("oscillation").main(["--device", "cuda"])


def test_fake_quant_triton_unusable_is_an_error_up_front(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the triton backend runs here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read per call: no interpreter, so no triton on the CPU
    with pytest.raises(SystemExit, match="--impl quantkern-triton: not usable on cpu"):
        _bench("fake_quant_lsq").main(["--quick", "--impl", "quantkern-triton", "--no-plot", "--no-pagefault"])


@pytest.mark.parametrize("skip_hqq", [False, True])
def test_hqq_minilm_without_the_hqq_package(monkeypatch, capsys, skip_hqq):
    """--minilm without hqq: its rows are skipped, as on the default path (a tiny stand-in model)."""
    import torch

    import quantkern.ptq.models as models

    monkeypatch.setitem(sys.modules, "hqq", None)  # import hqq -> ImportError
    monkeypatch.setattr(models, "load_minilm", lambda device: torch.nn.Sequential(torch.nn.Linear(128, 64)))
    threads = torch.get_num_threads()
    try:
        _bench("hqq").main(["--quick", "--minilm", "--threads", str(threads)] + (["--skip-hqq"] if skip_hqq else []))
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert ("its rows are skipped" in err) != skip_hqq, err
    assert "1 Linear weights" in out and "quantkern hqq_quantize (defaults)" in out and "hqq Quantizer" not in out, out


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


@pytest.mark.skipif(not {"avx512_vnni", "avx512vbmi"} <= _cpu_flags(), reason="needs AVX-512 VNNI and VBMI")
def test_packed_linear_stream_hot_harness_builds_and_runs(tmp_path):
    """benchmarks/packed_linear_stream/run.sh with HOTLOOP=1 (hot-weight A/B) builds two variants of the kernel
    headers and runs them over a tiny weight with a partial chunk and 3 rows of x; no timing
    checked, the second variant (the same headers) must give the first's output."""
    cpu = os.path.join(ROOT, "csrc", "cpu")
    env = dict(os.environ, OUT=str(tmp_path), HOTLOOP="1", K="1120", N="13", GS="32", M="3", R="2", REPS="2")
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "packed_linear_stream", "run.sh"), "3", cpu, cpu],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if "cycles per 256 weights" in ln]
    assert len(lines) == 2 and all("int3 M=3" in ln and "same output as the first" in ln for ln in lines), r.stdout


@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="needs AVX2 and FMA")
def test_packed_linear_stream_avx2_bench_builds_and_runs(tmp_path):
    """benchmarks/packed_linear_stream/avx2_bench.cpp (the library's AVX2 GEMV / GEMM timed outside
    torch) builds against this checkout and gives output 0 within 1e-3 of its double reference, on one
    thread and on two (T2=1), at M = 1 / 3 (the GEMV) and 13 (the int16 GEMM); no timing checked."""
    exe = str(tmp_path / "avx2_bench")
    cpu = os.path.join(ROOT, "csrc", "cpu")
    subprocess.run(["g++", "-O2", "-std=c++20", "-ffp-contract=off", "-fno-math-errno", "-I" + cpu,
                    os.path.join(ROOT, "benchmarks", "packed_linear_stream", "avx2_bench.cpp"),
                    os.path.join(cpu, "isa_avx2.cpp"), os.path.join(cpu, "cpu_features.cpp"), "-o", exe, "-pthread"],
                   check=True, timeout=600)
    for env, args in (({"MBF": "1"}, ["4", "1", "40"]), ({"T2": "1", "K": "768", "GS": "32"}, ["3", "3", "37", "2"]),
                      ({"T2": "1", "MBF": "1"}, ["2", "13", "37"])):
        out = subprocess.run([exe] + args, env=dict(os.environ, **env), capture_output=True, text=True, timeout=120,
                             check=True).stdout
        y0, ref = float(out.split("y[0]")[1].split()[0]), float(out.split("reference")[1].split()[0])
        assert " ms " in out and abs(y0 - ref) <= 1e-3 * max(1.0, abs(ref)), out


@pytest.mark.skipif(not {"avx512_vnni", "avx512vbmi", "gfni"} <= _cpu_flags(), reason="needs AVX-512 VNNI, VBMI, GFNI")
def test_packed_linear_stream_pipe_probes_build_and_run(tmp_path):
    """benchmarks/packed_linear_stream/pipes.cpp (instruction-throughput probes) builds and prints
    every probe with a positive cycle count; no timing checked."""
    exe = str(tmp_path / "pipes")
    src = os.path.join(ROOT, "benchmarks", "packed_linear_stream", "pipes.cpp")
    subprocess.run(["g++", "-O3", "-funroll-all-loops", "-std=c++17", "-o", exe, src], check=True, timeout=120)
    out = subprocess.run([exe], capture_output=True, text=True, timeout=120, check=True).stdout
    cycles = [float(ln.split()[-2]) for ln in out.splitlines() if ln.endswith(" cycles")]
    assert len(cycles) == 19 and all(c > 0 for c in cycles), out


def test_effnet_sensitivity_args_and_layer_kinds(capsys):
    """benchmarks/effnet_sensitivity.py: bad arguments stop at parse time (before the model loads);
    every layer name of EfficientNet-Lite0 maps to one kind."""
    from torch import nn

    from benchmarks import effnet_sensitivity as es

    for argv, msg in ((["--bits", "9"], "--bits must be in 1..8"), (["--per-layer", "bogus"], "'bogus' is not one of"),
                      (["--method", "gptq"], "invalid choice"), (["--threads", "0"], "must be >= 1")):
        with pytest.raises(SystemExit) as e:
            es.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err, (argv, err)
    dense, dw = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=8)
    assert es.layer_kind("_blocks.3._depthwise_conv", dw) == "dw"
    assert [es.layer_kind(n, dense) for n in ("_conv_stem", "_blocks.1._expand_conv", "_blocks.1._project_conv",
                                               "_conv_head")] == ["stem", "expand", "project", "head"]
    assert es.layer_kind("_fc", nn.Linear(8, 2)) == "fc"
    with pytest.raises(ValueError, match="unknown"):
        es.layer_kind("_blocks.0._se_reduce", dense)
