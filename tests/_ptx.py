"""GPU code generation without a GPU, for the codegen tests: Triton ships ptxas, so a kernel can be
compiled for sm_90 here and its PTX read. The compiling runs in a subprocess without
TRITON_INTERPRET (conftest.py sets it for the other tests, and triton reads it at import)."""
import os
import re
import subprocess
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def compile_ptx(fn, sig: dict, consts: dict, div16=(), num_warps: int = 4, num_stages: int | None = None) -> str:
    """PTX of the @triton.jit ``fn`` for sm_90: ``sig`` maps every argument to its type (constexprs
    included), ``div16`` names arguments to specialise as multiples of 16; fp fusion off, as our launches."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(list(sig).index(a),): [["tt.divisibility", 16]] for a in div16}
    opts = {"num_warps": num_warps, "enable_fp_fusion": False}
    if num_stages is not None:
        opts["num_stages"] = num_stages
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    return k.asm["ptx"]


def instructions(ptx: str) -> set:
    """The instruction mnemonics of a PTX listing (predicates stripped)."""
    return set(re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, re.M))


def run_script(script: str, timeout: int) -> list:
    """Runs ``script`` (which may ``import _ptx``) in a fresh interpreter without TRITON_INTERPRET;
    skips without ptxas; returns its stdout lines (asserts that it succeeded)."""
    from triton import knobs

    if knobs.nvidia.ptxas.path is None:
        pytest.skip("no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_HERE, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()
