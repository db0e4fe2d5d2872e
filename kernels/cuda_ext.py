"""CUDA C++ MoE path: alignment / permutation, row gather, clamped SwiGLU and the weighted combine
(``csrc/moe_kernels.cuh``, bound in ``csrc/moe_ops.cu``), built just-in-time with
``torch.utils.cpp_extension.load`` on first use. The two expert GEMMs run as grouped GEMMs over the
padded per-expert row blocks (``torch.nn.functional.grouped_mm`` for bf16, a loop over the active
experts otherwise).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

from .reference import Alignment, align_capacity

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "moe_ops.cu"]
HEADERS = [CSRC / "moe_kernels.cuh"]


def nvcc_path() -> str | None:
    """nvcc from CUDA_HOME (as cpp_extension resolves it) or PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_available() -> bool:
    """A CUDA device, a CUDA build of torch and nvcc: what the JIT build needs."""
    return bool(torch.cuda.is_available() and torch.version.cuda and nvcc_path())


@functools.lru_cache(maxsize=1)
def load_extension(verbose: bool = False):
    """Build (or reuse the cached build of) the extension; raises with the compiler output on failure."""
    if not cuda_available():
        raise RuntimeError(
            "the dsv41 CUDA MoE extension needs a CUDA device, a CUDA build of torch and nvcc "
            f"(cuda available: {torch.cuda.is_available()}, torch.version.cuda: {torch.version.cuda}, "
            f"nvcc: {nvcc_path()})"
        )
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    return load(
        name="dsv41_moe_cuda",
        sources=[str(s) for s in SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
        verbose=verbose,
    )


def align_cuda(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """CUDA version of :func:`dsv41.kernels.reference.align_reference` (identical output)."""
    ext = load_extension()
    idx = top_k_index.reshape(-1).contiguous()
    capacity = align_capacity(idx.numel(), num_experts, block_m)
    sorted_ids, block_expert, num_padded, slot_pos, counts = ext.moe_align(idx, num_experts, block_m, capacity)
    return Alignment(sorted_ids, block_expert, num_padded, slot_pos, counts, block_m)


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, counts_padded: torch.Tensor) -> torch.Tensor:
    """rows of x (grouped by expert, group e ends at ends[e]) @ w[e].T"""
    if x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and hasattr(torch.nn.functional, "grouped_mm"):
        return torch.nn.functional.grouped_mm(x, w.transpose(-2, -1), offs=ends)
    out = torch.zeros((x.shape[0], w.shape[1]), dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts_padded.tolist()):
        if n:
            torch.mm(x[start:start + n], w[e].to(x.dtype).t(), out=out[start:start + n])
        start += n
    return out


def cuda_experts(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 block_m: int = 16) -> torch.Tensor:
    """Experts-interface backend on the CUDA C++ kernels (dense weights; forward only)."""
    gu, dn = experts.gate_up_proj, experts.down_proj
    if gu.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the cuda experts backend takes dense float weights, got {gu.dtype}; "
                         "use the triton backend for FP8 / MXFP4 experts")
    if torch.is_grad_enabled() and (hidden_states.requires_grad or gu.requires_grad):
        from dsv41.modeling.moe_deepseek_v4 import cpu_grouped_experts

        return cpu_grouped_experts(experts, hidden_states, top_k_index, top_k_weights)
    if hidden_states.device.type != "cuda":
        raise RuntimeError(f"the cuda experts backend needs CUDA tensors, got {hidden_states.device}")
    ext = load_extension()
    t, _ = hidden_states.shape
    top_k = top_k_index.shape[1]
    num_experts = gu.shape[0]
    if t == 0:
        return torch.empty_like(hidden_states)
    x = hidden_states.contiguous()
    al = align_cuda(top_k_index, num_experts, block_m)
    padded = (al.counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0, dtype=torch.int32)
    xs = ext.gather_rows(x, al.sorted_ids, al.num_padded, top_k)
    gate_up = _grouped_linear(xs, gu, ends, padded)
    h = ext.clamped_swiglu(gate_up.contiguous(), al.num_padded, float(experts.limit))
    y = _grouped_linear(h, dn, ends, padded)
    return ext.combine(y.contiguous(), al.slot_pos, top_k_weights.float().contiguous(), t, top_k)
