"""Native one-token MoE decode for x86-64 CPUs with AVX-512 (``csrc/cpu_decode.cpp``).

Decode reads each selected expert's weights once; torch's bf16 GEMV (oneDNN packs the weights on
every call) and the Inductor-compiled gather-and-reduce both stay well below memory bandwidth, so
this hand-written gathered GEMV pair is what ``cpu_grouped`` uses first for one token with large
experts (see ``dsv41.modeling.moe_deepseek_v4._fused_decode``). It is built just-in-time with
``torch.utils.cpp_extension.load`` on first use (about 30 s, cached under torch's extensions
directory afterwards); without AVX-512, a C++ compiler, or with ``DSV41_CPU_NATIVE_DECODE=0`` the
compiled PyTorch path is used instead.
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
SOURCE = CSRC / "cpu_decode.cpp"
logger = logging.getLogger(__name__)
_STATE: dict[str, str] = {}


def cpu_decode_supported() -> tuple[bool, str]:
    """(usable, why): x86-64 with AVX-512 (as torch detects it) and a C++ compiler."""
    if os.environ.get("DSV41_CPU_NATIVE_DECODE", "1") == "0":
        return False, "disabled by DSV41_CPU_NATIVE_DECODE=0"
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


@functools.lru_cache(maxsize=1)
def load_cpu_extension(verbose: bool = False):
    """Build (or load the cached build of) the extension; raises with the compiler output on failure."""
    ok, why = cpu_decode_supported()
    if not ok:
        raise RuntimeError(f"the dsv41 CPU decode kernel cannot be built here: {why}")
    from torch.utils.cpp_extension import load

    logger.warning("dsv41: building the native CPU decode kernel (first use only; cached afterwards)")
    return load(
        name="dsv41_cpu_decode",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-mavx512f", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=verbose,
    )


def native_decode(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor, limit: float) -> torch.Tensor | None:
    """One token (``x [1, H]``, ``top_k_index [1, k]``) -> ``[1, H]`` in x's dtype, or None when the
    kernel does not apply here (then the caller uses another path)."""
    if "failed" in _STATE or x.device.type != "cpu" or gate_up.dtype not in (torch.bfloat16, torch.float32):
        return None
    if not (gate_up.is_contiguous() and down.is_contiguous()):
        return None
    if "ok" not in _STATE:
        ok, why = cpu_decode_supported()
        if not ok:
            _STATE["failed"] = why
            return None
        try:
            load_cpu_extension()
        except Exception as exc:  # compiler error, missing headers, ...
            _STATE["failed"] = repr(exc)
            warnings.warn(f"dsv41: native CPU decode kernel unavailable ({type(exc).__name__}); using the compiled "
                          "PyTorch path", stacklevel=2)
            return None
        _STATE["ok"] = why
    return load_cpu_extension().moe_decode(gate_up, down, x, top_k_index, top_k_weights, float(limit))
