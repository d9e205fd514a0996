"""Builds the CUDA emulator: every ``csrc/cuda/*.cu`` rewritten and compiled as C++ with g++.

The kernels run unchanged on the CPU (``emu.h`` says how and what that checks). The ops register
under ``torch.ops.quantkern_emu`` with the same names and arguments as ``torch.ops.quantkern`` and
take CPU tensors. Nothing here needs a GPU or the CUDA torch: only the CUDA headers (``cuda_fp16.h``,
``cuda_runtime.h``) of an installed toolkit, found from ``CUDA_HOME`` or ``nvcc`` on the PATH.

``python -m tests.cuda_emu.build`` builds (or finds in the cache, ``build/cuda_emu/<hash>``) and
prints the library's path; ``load()`` does the same and loads it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CU_DIR = ROOT / "csrc" / "cuda"
NAMESPACE = "quantkern_emu"


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_fp16.h), or None."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parents[1]))
    homes.append("/usr/local/cuda")
    for h in homes:
        if h and (Path(h) / "include" / "cuda_fp16.h").is_file():
            return Path(h) / "include"
    return None


_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(\s*(\)?)", re.S)
_DYN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\s*\[\s*\]\s*;")
_REGISTER = re.compile(r"TORCH_LIBRARY_IMPL\(\s*quantkern\s*,\s*CUDA\s*,\s*(\w+)\s*\)")


def transform(src: str) -> str:
    """A .cu file's text -> C++ for g++ with emu.h: launches become ``qk_emu::Launch(...).run(<a lambda calling the kernel>, ...)``,
    ``extern __shared__`` arrays point at the launch's dynamic shared memory, and the CUDA op
    registrations become definitions in the ``quantkern_emu`` namespace (schemas inferred)."""
    def launch(m):
        kernel, cfg, empty = m.group(1), m.group(2), m.group(3)
        call = f"[&](auto&... qk_a) {{ {kernel}(qk_a...); }}"
        return f"::qk_emu::Launch({cfg}).run({call}" + (")" if empty else ", ")

    out, n = _LAUNCH.subn(launch, src)
    if n != src.count("<<<"):
        raise RuntimeError(f"cuda_emu: rewrote {n} of {src.count('<<<')} kernel launches")
    out = _DYN_SMEM.sub(r"\1* \2 = static_cast<\1*>(::qk_emu::dyn_smem());", out)
    out, n = _REGISTER.subn(rf"TORCH_LIBRARY_FRAGMENT({NAMESPACE}, \1)", out)
    if n != 1:
        raise RuntimeError(f"cuda_emu: expected one TORCH_LIBRARY_IMPL(quantkern, CUDA, m), found {n}")
    return re.sub(r"\bm\.impl\(", "m.def(", out)


def _flags(inc: Path) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return (["-std=c++20", "-O1", "-fPIC", "-ffp-contract=off", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             "-include", str(HERE / "emu.h"), f"-I{HERE / 'include'}", f"-I{CU_DIR}", f"-I{inc}"]
            + [f"-isystem{p}" for p in cpp_extension.include_paths()])


def _key(inc: Path) -> str:
    h = hashlib.sha256()
    files = sorted(CU_DIR.glob("*.cu*")) + sorted((ROOT / "csrc" / "shared").glob("*.h")) + \
        sorted((ROOT / "csrc" / "cpu").glob("*.h")) + sorted(HERE.rglob("*.h")) + [HERE / "runtime.cpp", Path(__file__)]
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    h.update(f"{torch.__version__} {inc}".encode())
    return h.hexdigest()[:16]


def build(jobs: int | None = None, verbose: bool = False) -> Path:
    """Compiles the emulator library if the cache has none for these sources; returns its path."""
    inc = cuda_include()
    if inc is None:
        raise RuntimeError("cuda_emu: no CUDA toolkit headers (cuda_fp16.h) found; set CUDA_HOME")
    out = ROOT / "build" / "cuda_emu" / _key(inc)
    lib = out / f"lib{NAMESPACE}.so"
    if lib.is_file():
        return lib
    (out / "cuda").mkdir(parents=True, exist_ok=True)
    units = []
    for cu in sorted(CU_DIR.glob("*.cu")):
        cpp = out / "cuda" / (cu.stem + ".cpp")
        cpp.write_text(f'#line 1 "{cu}"\n' + transform(cu.read_text()))
        units.append(cpp)
    units.append(HERE / "runtime.cpp")
    flags = _flags(inc)

    def compile_one(src: Path) -> Path:
        obj = out / (src.stem + ".o")
        cmd = ["g++", *flags, "-c", str(src), "-o", str(obj)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"cuda_emu: compiling {src.name} failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
        if verbose:
            print(f"cuda_emu: compiled {src.name}", file=sys.stderr)
        return obj

    with ThreadPoolExecutor(jobs or min(4, os.cpu_count() or 1)) as ex:
        objs = list(ex.map(compile_one, units))
    tlib = str(Path(torch.__file__).parent / "lib")
    tmp = lib.with_suffix(".tmp.so")
    cmd = ["g++", "-shared", "-o", str(tmp), *map(str, objs), f"-L{tlib}", "-lc10", "-ltorch_cpu", "-ltorch",
           f"-Wl,-rpath,{tlib}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"cuda_emu: linking failed:\n{r.stderr[-4000:]}")
    tmp.replace(lib)  # atomic: a concurrent build never loads a half-written library
    return lib


_loaded: Path | None = None


def load() -> Path:
    """Builds (if needed) and loads the emulator library; the ops appear as ``torch.ops.quantkern_emu.*``."""
    global _loaded
    if _loaded is None:
        lib = build()
        torch.ops.load_library(str(lib))
        _loaded = lib
    return _loaded


if __name__ == "__main__":
    print(build(verbose=True))
