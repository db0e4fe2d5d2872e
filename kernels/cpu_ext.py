"""Native routed-expert kernel for x86-64 CPUs with AVX-512 (``csrc/cpu_moe.cpp``).

For few rows per expert (decode and small batches) the experts are memory-bound: each hit
expert's weights should be read once per call. torch's small-M bf16 matmuls (oneDNN repacks the
weights on every call) and a loop of per-expert GEMMs both stay well below memory bandwidth, so
``cpu_grouped`` sends such calls to this hand-written kernel (counting sort by expert, register
tiles of 2 weight rows x up to 8 rows, VDPBF16PS for bf16 when the CPU has AVX512_BF16, float32
accumulation; see ``dsv41.modeling.moe_deepseek_v4._native_experts``). It is built just-in-time
with ``torch.utils.cpp_extension.load`` on first use (about 30 s, cached under torch's extensions
directory afterwards); without AVX-512, a C++ compiler or ninja, or with ``DSV41_CPU_NATIVE=0``,
the PyTorch paths are used instead.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "cpu_moe.cpp"
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-fopenmp"]
logger = logging.getLogger(__name__)
_STATE: dict[str, str] = {}


def cpu_native_supported() -> tuple[bool, str]:
    """(usable, why): x86-64 with AVX-512 (as torch detects it), a C++ compiler and ninja."""
    if os.environ.get("DSV41_CPU_NATIVE", "1") == "0":
        return False, "disabled by DSV41_CPU_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"needs x86-64, this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return False, f"needs AVX-512 (torch reports {capability})"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        return False, "no C++ compiler (c++ / g++ / $CXX)"
    if not _ninja_on_path():
        return False, "no ninja build tool (pip install ninja)"
    return True, f"AVX-512, compiler {compiler}"


def _ninja_on_path() -> bool:
    """torch's JIT build runs `ninja` from PATH; the pip ``ninja`` wheel's binary is added when the
    virtual environment is not activated."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def _built_before() -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory("dsv41_cpu_moe", verbose=False)) / "dsv41_cpu_moe.so").exists()
    except Exception:  # a private torch helper: if it moves, just announce the build
        return False


@functools.lru_cache(maxsize=1)
def load_cpu_extension(verbose: bool = False):
    """Build (or load the cached build of) the extension; raises with the compiler output on failure."""
    ok, why = cpu_native_supported()
    if not ok:
        raise RuntimeError(f"the dsv41 native CPU experts kernel cannot be built here: {why}")
    from torch.utils.cpp_extension import load

    if not _built_before():
        logger.warning("dsv41: building the native CPU experts kernel (first use only, ~30 s; cached afterwards)")
    return load(name="dsv41_cpu_moe", sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                verbose=verbose)


_KERNEL: list = []  # the loaded extension's moe_experts, once it built


def native_experts(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor, limit: float, bf16_dot: int = -1) -> torch.Tensor | None:
    """``x [T, H]``, ``top_k_index / top_k_weights [T, k]`` -> ``[T, H]`` in x's dtype, or None when the
    kernel does not apply (weights that are not contiguous float32 / bfloat16, tensors not on CPU, or
    no kernel here); then the caller uses another path. ``bf16_dot``: -1 uses VDPBF16PS for bf16
    weights when the CPU has it, 0 widens bf16 to float32 instead (1 requires VDPBF16PS).
    The applicability checks run in C++: at one token this call is on the decode critical path."""
    if not _KERNEL:
        if "failed" in _STATE:
            return None
        ok, why = cpu_native_supported()
        if not ok:
            _STATE["failed"] = why
            return None
        try:
            _KERNEL.append(load_cpu_extension().moe_experts)
        except Exception as exc:  # compiler error, missing headers, ...
            _STATE["failed"] = repr(exc)
            warnings.warn(f"dsv41: native CPU experts kernel unavailable ({type(exc).__name__}); using the PyTorch "
                          "paths", stacklevel=2)
            return None
        _STATE["ok"] = why
    return _KERNEL[0](gate_up, down, x, top_k_index, top_k_weights, float(limit), bf16_dot)
