"""Builds quantkern and its kernel library quantkern._C.

CPU kernels (csrc/cpu) are always built. CUDA kernels (csrc/cuda) are built
when QUANTKERN_CUDA=1, or when QUANTKERN_CUDA=auto (the default) and both a
CUDA build of torch and a CUDA toolkit (CUDA_HOME) are present. A visible GPU
is never required: the architectures come from TORCH_CUDA_ARCH_LIST
(default "8.0+PTX;9.0a": sm_80 and sm_90a code, plus sm_80 PTX for newer GPUs).

Install with `pip install --no-build-isolation -e .` so the build uses the
torch already installed (build isolation would fetch another one).
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    mode = os.environ.get("QUANTKERN_CUDA", "auto").lower()
    have = cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda is not None
    if mode in ("0", "off", "false"):
        return False
    if mode in ("1", "on", "true"):
        if not have:
            raise RuntimeError(
                "QUANTKERN_CUDA=1 but no CUDA build of torch or no CUDA toolkit "
                f"(torch.version.cuda={__import__('torch').version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
            )
        return True
    if mode != "auto":
        raise RuntimeError(f"QUANTKERN_CUDA must be auto, 0 or 1, got {mode!r}")
    return have


def simde_include():
    """SIMDe's headers (the simde-py package), for the emulated AVX-512 table (csrc/cpu/isa_avx512emu.cpp)."""
    try:
        import simde_py
    except ImportError:
        print("quantkern: simde-py is not installed: building without the emulated AVX-512 table (avx512emu); "
              "the AVX-512 kernels' tests will not run on CPUs without AVX-512")
        return None
    return simde_py.get_include()


def extension():
    rel = lambda pats: sorted(os.path.relpath(p, ROOT) for pat in pats for p in glob.glob(os.path.join(ROOT, pat)))
    sources = rel(["csrc/cpu/*.cpp"])
    simde = simde_include()
    macros, incs = ([("QK_HAVE_SIMDE", "1")], [simde]) if simde else ([], [])
    # -std=c++20: torch 2.14's headers require it (ATen.h errors out below C++20),
    # and it is torch's own default since 2.13.
    # -ffp-contract=off: no silent FMA contraction, so every variant rounds
    # exactly as the reference does (DESIGN.md section 2).
    # -fopenmp: at::parallel_for is an inline OpenMP loop; without the flag it
    # silently runs on one thread. torch's wheel ships libgomp.so.1 and the
    # loader reuses it (same soname), so there is one OpenMP runtime.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
    link = ["-fopenmp"]
    if os.environ.get("QUANTKERN_SANITIZE") == "1":  # scripts/sanitize.sh: ASan + UBSan build of the CPU kernels
        san = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined,float-cast-overflow",
               "-fno-sanitize=vptr"]  # (vptr: false reports on torch's classes)
        cxx, link = cxx + san, link + san[3:]
    if not want_cuda():
        return cpp_extension.CppExtension("quantkern._C", sources, define_macros=macros, include_dirs=incs,
                                          extra_compile_args={"cxx": cxx}, extra_link_args=link)
    # 8.0+PTX: also sm_80 PTX, which the driver JIT-compiles on newer GPUs (sm_100, sm_120: "no kernel
    # image" otherwise); nothing here needs 9.0a features beyond what 8.0 PTX gives
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
    sources += rel(["csrc/cuda/*.cu"])
    # --fmad=false: nvcc, like the CPU build, contracts no a * b + c on its own, so the shared
    # __host__ __device__ headers round on the GPU exactly as the CPU tests check them (plain
    # double math in shared/calibrate.h gave last-bit different amax); kernels that want an FMA
    # write fmaf / __fmaf_rn, which the flag leaves alone.
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]
    return cpp_extension.CUDAExtension(
        "quantkern._C",
        sources,
        define_macros=[("QUANTKERN_WITH_CUDA", "1")] + macros,
        include_dirs=incs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    def finalize_options(self):
        super().finalize_options()
        # pip's editable build (scripts/setup.sh) hands build_ext a new temporary folder each time (and
        # ignores setup.cfg's build_temp), so ninja found no objects and every setup rebuilt the whole
        # extension: a fixed folder in the tree keeps them (ninja rebuilds what changed, flags included)
        self.build_temp = os.path.join(ROOT, "build", "temp-ext")


setup(
    name="quantkern",
    version="0.1.0",
    description="Quantization kernels for PyTorch: LSQ+ QAT, oscillation control, PTQ, packed low-bit matmul",
    packages=find_packages(include=["quantkern", "quantkern.*"]) + ["quantkern.triton_kernels"],
    # triton ships a package named triton_kernels: ours installs inside quantkern.
    package_dir={"quantkern.triton_kernels": "triton_kernels"},
    package_data={"quantkern.ptq": ["data/*.txt"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.10",
    install_requires=["numpy", "safetensors", "tqdm"],
    extras_require={"triton": ["triton"], "test": ["pytest", "triton"], "bench": ["matplotlib"]},
)
