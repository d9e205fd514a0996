"""Shared benchmark helpers: timing, copy bandwidth, tables, plots, JSON, CLI.

Every ``benchmarks/bench_<op>.py`` uses the same pieces so that numbers are
taken, printed and saved the same way:

* :func:`measure` -- median wall time (ms) of ``fn()`` after warm-up, with the
  spread; ``time.perf_counter`` on the CPU, CUDA events (plus
  ``torch.cuda.synchronize``) on a GPU.
* :func:`copy_bandwidth` / :func:`read_bandwidth` -- the machine's copy and read bandwidth measured in the same
  run (GB/s counting bytes read + bytes written, copy into an existing
  buffer), the denominator of the roofline fraction; :func:`memory_bytes` sizes their
  buffers (and cold-weight pools) above the last-level cache.
* :class:`Row`, :func:`print_table`, :func:`save_plot`, :func:`write_json`.
* :func:`add_common_args` / :func:`apply_common_args` -- ``--quick``,
  ``--threads``, ``--reps``, ``--warmup``, ``--device``, ``--json``, ``--plot``;
  argparse types for the benchmarks' own options (:func:`positive_int`,
  :func:`comma_list`, ...): a bad value is a one-line usage error (exit 2).

GB/s here is decimal (1e9 bytes per second), as memory bandwidth is usually
quoted.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

import torch

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
MiB = 1 << 20


# ------------------------------------------------------------------ timing
@dataclasses.dataclass
class Timing:
    """Result of :func:`measure`; all times in milliseconds."""

    median: float
    min: float
    max: float
    q1: float  # 25th percentile
    q3: float  # 75th percentile
    reps: int

    @property
    def spread(self) -> float:
        """Relative inter-quartile range, (q3 - q1) / median."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else float("nan")


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the device (no-op on the CPU)."""
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(dev)


CUDA_BLOCK = 20  # GPU calls per timed sample (see measure)


def measure(
    fn: Callable[[], Any],
    warmup: int = 3,
    reps: int | None = None,
    *,
    device: torch.device | str = "cpu",
    budget_s: float = 1.0,
    min_reps: int = 5,
    max_reps: int = 100,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``reps`` timed calls; median ms.

    ``reps=None`` picks the count from the warm-up time so the timed part takes
    about ``budget_s`` (clamped to ``[min_reps, max_reps]``). On the CPU each call
    is timed on its own (perf_counter around the call), so one slow outlier moves
    the median not at all. On a GPU a pair of CUDA events around one call would
    also time the host's Python and launch work whenever that is longer than the
    kernel (a floor of ~25-45 us), so each timed sample is a block of
    ``CUDA_BLOCK`` back-to-back calls between one pair of events, divided by the
    block size. Results of ``fn`` are dropped before the next call.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    t_warm = 0.0
    for _ in range(max(warmup, 0)):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        t_warm = time.perf_counter() - t0  # the last one: the warmest
    if reps is None:
        if t_warm <= 0:
            t0 = time.perf_counter()
            fn()
            sync(dev)
            t_warm = time.perf_counter() - t0
        # (a GPU sample is CUDA_BLOCK calls: sized so that the timed part takes about budget_s there too)
        reps = int(min(max(budget_s / (max(t_warm, 1e-9) * (CUDA_BLOCK if cuda else 1)), min_reps), max_reps))
    reps = max(int(reps), 1)
    times: list[float] = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            for _ in range(CUDA_BLOCK):
                fn()
            ends[i].record()
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) / CUDA_BLOCK for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    xs = sorted(times)
    return Timing(statistics.median(xs), xs[0], xs[-1], _quantile(xs, 0.25), _quantile(xs, 0.75), reps)


def cold_copies(nbytes: int, pool_bytes: int) -> int:
    """How many copies of ``nbytes`` of data a cold-data rotation needs so that between two uses of
    one copy the other copies, at least ``pool_bytes`` of them, are touched (>= 2)."""
    return max(2, -(-pool_bytes // max(nbytes, 1)) + 1)


def llc_bytes() -> int:
    """Size in bytes of the CPU's largest cache (``/sys/devices/system/cpu/cpu0/cache``); 0 if unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        entries = os.listdir(base)
    except OSError:
        return 0
    for e in entries:
        try:
            with open(os.path.join(base, e, "size")) as f:
                txt = f.read().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:].upper(), 1)
        try:
            best = max(best, int(txt.rstrip("KMGkmg")) * unit)
        except ValueError:
            continue
    return best


def memory_bytes(floor_mib: int) -> int:
    """A buffer size that streams from memory, not cache: ``floor_mib`` MiB, or twice the last-level
    cache where that is larger. Some hosts expose a 480 MiB L3: a 256 MiB probe then reads at cache
    speed (39 GB/s against 24 GB/s from memory on 2 threads, 2026-12-04) and every roofline
    fraction computed from it is understated."""
    return max(floor_mib * MiB, 2 * llc_bytes())


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 256 * MiB, reps: int = 10, warmup: int = 2) -> float:
    """Copy bandwidth in GB/s (read + write bytes) for ``dst.copy_(src)`` into an existing buffer.

    Median of ``reps``; use a buffer well above the last-level cache to get
    the memory (not cache) bandwidth. Measured with the current
    ``torch.get_num_threads()``.
    """
    dev = torch.device(device)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.zeros(n, dtype=torch.float32, device=dev)
    t = measure(lambda: dst.copy_(src), warmup=warmup, reps=reps, device=dev)
    return 2 * n * 4 / (t.median * 1e-3) / 1e9


def read_bandwidth(device: torch.device | str = "cpu", nbytes: int = 256 * MiB, reps: int = 10, warmup: int = 2) -> float:
    """Read bandwidth in GB/s: the fastest of three reads of ``nbytes``, each the median of ``reps``.

    The ceiling of a kernel that streams a weight and writes almost nothing (a GEMV). Probes:
    ``torch.mv`` of an fp32 ``[nbytes / 16 KiB, 4096]`` matrix (one FMA per 4 bytes read: the BLAS
    runs it at the read bandwidth on Intel CPUs, where ``sum()`` / ``amax()`` were slower), and
    ``amax()`` of it and ``sum()`` of the same bytes as int64 (on an AMD EPYC host MKL's sgemv read
    20 GB/s where these read 33-35: a packed GEMV reading 34 GB/s showed 160% of that "roofline").
    The maximum is a lower bound of what the memory delivers. On the CPUs here it is about 10-20%
    above :func:`copy_bandwidth`, whose writes cost read-for-ownership traffic.
    """
    dev = torch.device(device)
    a = torch.ones(max(1, nbytes // (4 * 4096)), 4096, dtype=torch.float32, device=dev)
    v = torch.ones(4096, dtype=torch.float32, device=dev)
    i64 = a.view(torch.int64)
    best = 0.0
    for f in (lambda: torch.mv(a, v), lambda: a.amax(), lambda: i64.sum()):
        t = measure(f, warmup=warmup, reps=reps, device=dev)
        best = max(best, a.numel() * 4 / (t.median * 1e-3) / 1e9)
    return best


# ------------------------------------------------------------------- rows
@dataclasses.dataclass
class Row:
    """One measured line. ``bytes``/``flops`` let the table derive GB/s and TFLOP/s.

    ``extra`` holds benchmark-specific columns (e.g. ``{"speedup": 2.1}``);
    :func:`print_table` looks columns up on the row first, then in ``extra``.
    """

    case: str
    impl: str
    pass_: str = ""
    ms: float = float("nan")
    spread: float = float("nan")  # relative IQR
    bytes: float | None = None
    flops: float | None = None
    note: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def gbps(self) -> float | None:
        if self.bytes is None or not self.ms or not math.isfinite(self.ms):
            return None
        return self.bytes / (self.ms * 1e-3) / 1e9

    @property
    def tflops(self) -> float | None:
        if self.flops is None or not self.ms or not math.isfinite(self.ms):
            return None
        return self.flops / (self.ms * 1e-3) / 1e12

    def get(self, col: str):
        if col == "pass":
            return self.pass_
        if col in self.extra:
            return self.extra[col]
        return getattr(self, col, None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("pass_")
        extra = d.pop("extra")
        d["gbps"] = self.gbps
        d["tflops"] = self.tflops
        d.update(extra)
        return d

    @classmethod
    def from_timing(cls, case: str, impl: str, pass_: str, t: Timing, **kw) -> "Row":
        return cls(case=case, impl=impl, pass_=pass_, ms=t.median, spread=t.spread, **kw)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        a = abs(v)
        if a >= 100:
            return f"{v:.1f}"
        if a >= 10:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


# Column title and formatter overrides; anything else uses the name and _fmt.
_TITLES = {"ms": "ms", "spread": "iqr%", "gbps": "GB/s", "tflops": "TFLOP/s", "pass": "pass"}
_FORMATS: dict[str, Callable[[Any], str]] = {
    "spread": lambda v: "-" if v is None or not math.isfinite(v) else f"{100 * v:.0f}",
    "roofline": lambda v: "-" if v is None or not math.isfinite(v) else f"{100 * v:.0f}%",
}


def format_table(rows: Iterable[Row], columns: Sequence[str], titles: dict[str, str] | None = None) -> str:
    """A markdown table (pipes, aligned), numbers right-aligned."""
    rows = list(rows)
    titles = {**_TITLES, **(titles or {})}
    head = [titles.get(c, c) for c in columns]
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            f = _FORMATS.get(c)
            if f is None and c.endswith("x") and isinstance(v, float):  # ratio columns: "vs_torch_x"
                f = lambda v: "n/a" if not math.isfinite(v) else f"{v:.2f}x"
            cells.append(f(v) if f else _fmt(v))
        body.append(cells)
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    numeric = [all(_looks_numeric(b[i]) for b in body) and body != [] for i in range(len(head))]

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            out.append(c.rjust(widths[i]) if numeric[i] else c.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if numeric[i] else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def _looks_numeric(s: str) -> bool:
    s = s.rstrip("x%")
    if s in ("-", "n/a", ""):
        return True
    try:
        float(s)
        return True
    except ValueError:
        return False


def print_table(rows: Iterable[Row], columns: Sequence[str], title: str | None = None, file=None,
                titles: dict[str, str] | None = None) -> None:
    file = file or sys.stdout
    if title:
        print(f"\n### {title}\n", file=file)
    print(format_table(rows, columns, titles), file=file)
    file.flush()


# ------------------------------------------------------------------- plot
def save_plot(rows: Sequence[Row], path: str, metric: str = "ms", title: str | None = None, log: bool = True) -> str | None:
    """Grouped bar chart, one panel per case, groups = pass, bars = impl; returns the path or None.

    Needs matplotlib (Agg backend, no display); without it, prints a note and
    returns None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot written to {path})", file=sys.stderr)
        return None
    rows = [r for r in rows if r.get(metric) is not None and math.isfinite(r.get(metric))]
    if not rows:
        return None
    cases = list(dict.fromkeys(r.case for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(max(5.0, 1.2 * len(impls) + 3) * len(cases), 4.2), squeeze=False)
    width = 0.8 / max(len(impls), 1)
    for ax, case in zip(axes[0], cases):
        crow = [r for r in rows if r.case == case]
        passes = list(dict.fromkeys(r.pass_ for r in crow))
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, p in enumerate(passes):
                v = [r.get(metric) for r in crow if r.impl == impl and r.pass_ == p]
                if v:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(v[0])
            if xs:
                bars = ax.bar(xs, ys, width, label=impl)
                ax.bar_label(bars, labels=[_fmt(y) for y in ys], fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(passes)), passes)
        ax.set_title(case, fontsize=9)
        ax.set_ylabel(_TITLES.get(metric, metric) + (" (log)" if log else ""))
        if log:
            ax.set_yscale("log")
        ax.margins(y=0.25)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------- environment
def env_info(device: torch.device | str = "cpu") -> dict:
    """What the numbers were taken on (goes into the JSON and the table header)."""
    dev = torch.device(device)
    info: dict[str, Any] = {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "argv": " ".join(sys.argv),
    }
    try:
        import quantkern

        info["quantkern"] = quantkern.__version__
        info["cpu_capability"] = quantkern.get_cpu_capability()
    except Exception as e:  # noqa: BLE001 -- reported, not fatal
        info["quantkern_error"] = str(e)
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(info: dict) -> str:
    s = f"torch {info['torch']}, {info['device']}, {info['threads']} thread(s), {info['cpu']}"
    if "gpu" in info:
        s += f", {info['gpu']}"
    if "cpu_capability" in info:
        s += f", quantkern CPU kernels: {info['cpu_capability']}"
    if "loadavg" in info:
        s += f", load avg {info['loadavg'][0]:.1f}"
    return s


# ------------------------------------------------------------------- JSON
def write_json(path: str, rows: Sequence[Row], meta: dict | None = None, **sections) -> None:
    """Write ``{"meta": ..., "rows": [...], **sections}``; ``path == "-"`` writes to stdout."""
    doc = {"meta": meta or {}, "rows": [r.to_dict() for r in rows]}
    doc.update({k: ([r.to_dict() for r in v] if isinstance(v, list) and v and isinstance(v[0], Row) else v)
                for k, v in sections.items()})
    text = json.dumps(doc, indent=1, default=_json_default, allow_nan=True)
    if path == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


# -------------------------------------------------------------------- CLI
# Argument types: argparse turns an ArgumentTypeError into a one-line
# "error: argument --x: ..." and exit status 2, so a bad value stops the run
# before anything is measured, without a traceback.
def _int_at_least(s: str, lo: int) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
    return v


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(s, 1)


def nonneg_int(s: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(s, 0)


def positive_float(s: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {s!r}")
    return v


def device_name(s: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N`` (a meta or other device would time no work)."""
    try:
        d = torch.device(s)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda") or (d.type == "cpu" and d.index not in (None, 0)):
        raise argparse.ArgumentTypeError(f"{s!r} is not a benchmark device (cpu, cuda or cuda:N)")
    return s


def one_of(choices: Sequence) -> Callable[[str], Any]:
    """argparse type: one of ``choices`` (ints or strings), matched by its text."""
    def parse(s: str):
        for c in choices:
            if str(c) == s:
                return c
        raise argparse.ArgumentTypeError(f"{s!r} is not one of {', '.join(map(str, choices))}")
    return parse


def comma_list(item: Callable[[str], Any]) -> Callable[[str], list]:
    """argparse type: a comma list, each entry through ``item``. Empty entries are skipped
    (a trailing comma is harmless), but at least one entry must remain."""
    def parse(s: str) -> list:
        parts = [v.strip() for v in s.split(",") if v.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{s!r}: expected a comma list of at least one value")
        return [item(v) for v in parts]  # each item type's message names the bad entry
    return parse


def add_common_args(p: argparse.ArgumentParser, plot_name: str | None = None, *, threads: int | None = None,
                    warmup: int = 3, writes_files: bool = True, reps_help: str | None = None,
                    warmup_help: str | None = None) -> argparse.ArgumentParser:
    """Options every benchmark takes. ``plot_name``: default PNG under benchmarks/out/; ``threads`` /
    ``warmup``: this benchmark's defaults; ``reps_help`` / ``warmup_help``: what --reps / --warmup mean
    here, if not the defaults';
    ``writes_files=False``: a benchmark that writes no JSON or
    plot (it still accepts ``--json`` / ``--plot``: ``python -m benchmarks`` passes them to every one)."""
    p.add_argument("--quick", action="store_true", help="small sizes, few reps: a smoke test, not a measurement")
    default_threads = threads or "torch's"
    p.add_argument("--threads", type=positive_int, default=threads,
                   help=f"torch.set_num_threads(N) before measuring (default: {default_threads})")
    p.add_argument("--reps", type=positive_int, default=None,
                   help=reps_help or "timed repetitions per measurement (default: ~1 s worth, 5..100)")
    p.add_argument("--warmup", type=nonneg_int, default=warmup,
                   help=warmup_help or f"untimed calls before timing (default {warmup})")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda (default cpu)")
    if writes_files:
        json_help = "also write the rows as JSON to PATH ('-': stdout, table goes to stderr)"
    else:
        json_help = "ignored: this benchmark writes no JSON ('-': its table goes to stderr, stdout stays empty)"
    p.add_argument("--json", metavar="PATH", default=None, help=json_help)
    default_plot = os.path.join(OUT_DIR, plot_name) if plot_name else None
    plot_help = (f"PNG bar chart path (default {os.path.relpath(default_plot) if default_plot else 'none'}; needs matplotlib)"
                 if writes_files else "ignored: this benchmark writes no plot")
    p.add_argument("--plot", metavar="PATH", default=default_plot, help=plot_help)
    p.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="do not write a PNG")
    return p


def check_writable(option: str, path: str) -> None:
    """Exit with a usage message unless a file can be written at ``path`` (its folder is made): checked
    before measuring, since an unwritable ``--json`` / ``--plot`` path used to fail only after the run,
    losing its results."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise SystemExit(f"{option} {path}: is a directory (give a file path)")
    parent = os.path.dirname(full)
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise SystemExit(f"{option} {path}: cannot write there ({e.strerror or e})") from None


def apply_common_args(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` (validated by its type), check ``--device`` and that the ``--json`` /
    ``--plot`` paths can be written; returns the device."""
    for option in ("json", "plot"):
        path = getattr(args, option, None)
        if path and path != "-":
            check_writable("--" + option, path)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA device(s)")
    if args.quick and args.reps is None:
        args.reps = 3
    if args.quick:
        args.warmup = min(args.warmup, 1)
    return dev


def note_no_files(args: argparse.Namespace, name: str, out) -> None:
    """For a benchmark built with ``writes_files=False``: say that --json / --plot wrote nothing."""
    if args.json or args.plot:
        print(f"# {name} writes no JSON or plot: the table below is its output", file=out)


def plot_rows(rows: Sequence[Row], args: argparse.Namespace, out, title: str, metric: str = "ms") -> None:
    """Write the ``--plot`` chart, if one was asked for, and say where."""
    if args.plot:
        path = save_plot(rows, args.plot, metric=metric, title=title)
        if path:
            print(f"\nplot: {os.path.relpath(path)}", file=out)


def table_stream(args: argparse.Namespace):
    """Where tables go: stderr when the JSON goes to stdout."""
    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout
