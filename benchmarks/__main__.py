"""Run every benchmarks/bench_*.py: ``python -m benchmarks [--only NAME[,NAME]] [--list] [ARGS...]``.

Each benchmark runs in its own subprocess (a fresh process: environment
variables read once per process, thread settings and allocator caches do not
leak from one benchmark into the next). Every other argument is passed through
unchanged (``--quick``, ``--threads N``, ``--reps N``, ``--no-plot``, ...);
``--json PATH`` and ``--plot PATH`` become ``PATH`` with ``.<name>`` before the
suffix per benchmark when more than one runs; with ``--json -`` the runner's own lines go to
stderr, so stdout holds only the benchmarks' JSON (one document per benchmark). Exit status: non-zero if any benchmark failed.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def discover() -> list[str]:
    return sorted(os.path.basename(p)[len("bench_"):-3] for p in glob.glob(os.path.join(HERE, "bench_*.py")))


def _split(argv: list[str]):
    only, listing, rest = None, False, []
    it = iter(argv)
    for a in it:
        if a == "--only":
            only = next(it, "")
        elif a.startswith("--only="):
            only = a.split("=", 1)[1]
        elif a == "--list":
            listing = True
        elif a in ("-h", "--help") and not rest:
            print(__doc__)
            print("benchmarks:", ", ".join(discover()))
            sys.exit(0)
        else:
            rest.append(a)
    return only, listing, rest


def _per_bench_args(rest: list[str], name: str, many: bool) -> list[str]:
    """``rest`` for benchmark ``name``: with several benchmarks, ``--json PATH`` / ``--plot PATH``
    get ``.<name>`` before the suffix, so each writes its own file (``--json -`` stays stdout)."""
    if not many:
        return rest
    suffixed = {"--json": ".json", "--plot": ".png"}
    out, i = [], 0
    while i < len(rest):
        flag, eq, val = rest[i].partition("=")
        if flag in suffixed and (eq or i + 1 < len(rest)):
            val = val if eq else rest[i + 1]
            if val != "-":
                root, ext = os.path.splitext(val)
                val = f"{root}.{name}{ext or suffixed[flag]}"
            out.append(f"{flag}={val}")
            i += 1 if eq else 2
            continue
        out.append(rest[i])
        i += 1
    return out


def main(argv=None) -> int:
    only, listing, rest = _split(list(sys.argv[1:] if argv is None else argv))
    names = discover()
    if listing:
        print("\n".join(names))
        return 0
    if only is not None:  # "--only" with an empty value is a mistake, not "all of them"
        want = [n.strip().removeprefix("bench_").removesuffix(".py") for n in only.split(",") if n.strip()]
        if not want:
            print(f"--only needs benchmark name(s); available: {names}", file=sys.stderr)
            return 2
        missing = [n for n in want if n not in names]
        if missing:
            print(f"unknown benchmark(s) {missing}; available: {names}", file=sys.stderr)
            return 2
        names = want
    # with --json - the benchmarks' JSON goes to stdout: keep the runner's own lines off it
    json_stdout = "--json=-" in rest or any(a == "--json" and b == "-" for a, b in zip(rest, rest[1:]))
    log = sys.stderr if json_stdout else sys.stdout
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    failed = []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}"] + _per_bench_args(rest, name, len(names) > 1)
        print(f"\n## bench_{name}: {' '.join(cmd[1:])}", file=log, flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        print(f"## bench_{name}: exit {rc} in {time.perf_counter() - t0:.1f} s", file=log, flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
