"""Routed-expert computation for DeepSeek-V4 MoE layers: the plain reference and a CPU fast path.

Every backend has the signature of transformers' experts interface::

    fn(experts, hidden_states[T, H], top_k_index[T, k], top_k_weights[T, k]) -> [T, H]

where ``experts`` carries ``gate_up_proj`` [E, 2I, H] (gate rows, then up rows), ``down_proj``
[E, H, I], ``limit`` (the SwiGLU clamp) and ``num_experts``. The expert function is
``down(silu(min(gate, limit)) * clamp(up, -limit, limit))``, scaled by the routing weight and
summed over the k selected experts. Indices equal to ``num_experts`` (or negative) are ignored.

This file is copied next to saved checkpoints so that ``trust_remote_code`` loading is
self-contained; GPU kernels (Triton, CUDA) live in ``dsv41.kernels`` and register themselves
into ``MOE_BACKENDS`` when that package is importable.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Reused CPU scratch for the large intermediates of cpu_grouped (gathered rows, [S, 2I], [S, H]).
# Allocations above glibc's mmap threshold (32 MiB at most) are fresh pages on every call, and
# touching them costs more than the copies themselves (a 50 MB gather: 20 ms fresh, 2.3 ms reused).
# Per thread, at most SCRATCH_MAX_BYTES per buffer (DSV41_CPU_SCRATCH_MB, 0 disables).
SCRATCH_MAX_BYTES = int(float(os.environ.get("DSV41_CPU_SCRATCH_MB", "512")) * 2**20)
_SCRATCH = threading.local()


def _scratch(slot: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised [rows, cols] tensor; on CPU a view of a per-thread buffer kept for reuse.
    Only for intermediates that do not outlive the call."""
    nbytes = shape[0] * shape[1] * dtype.itemsize
    if device.type != "cpu" or nbytes > SCRATCH_MAX_BYTES or nbytes < 2**20:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(slot)
    if buf is None or buf.numel() < nbytes:
        buf = buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes].view(dtype).view(shape)


def release_scratch() -> None:
    """Free this thread's cpu_grouped scratch buffers."""
    _SCRATCH.buffers = {}


def clamped_swiglu(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def reference_experts(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Plain loop over the experts that received tokens (the semantics every backend must match)."""
    out = torch.zeros_like(hidden_states)
    num_experts = experts.gate_up_proj.shape[0]
    flat_expert = top_k_index.reshape(-1)
    token_of_slot = torch.arange(hidden_states.shape[0], device=hidden_states.device).repeat_interleave(
        top_k_index.shape[1]
    )
    flat_weight = top_k_weights.reshape(-1)
    for expert in torch.unique(flat_expert).tolist():
        if expert < 0 or expert >= num_experts:
            continue
        slots = (flat_expert == expert).nonzero().squeeze(-1)
        tokens = token_of_slot[slots]
        h = clamped_swiglu(F.linear(hidden_states[tokens], experts.gate_up_proj[expert]), experts.limit)
        y = F.linear(h, experts.down_proj[expert]) * flat_weight[slots, None].to(h.dtype)
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


def _grouped_autograd(experts, hidden_states, top_k_index, top_k_weights):
    """Training path of cpu_grouped (autograd through plain ops): slots sorted by expert, one pair of
    GEMMs per active expert, gathered back to slot order and summed over k."""
    num_tokens, k = top_k_index.shape
    num_experts = experts.gate_up_proj.shape[0]
    flat_expert = top_k_index.reshape(-1)
    valid = (flat_expert >= 0) & (flat_expert < num_experts)
    # invalid ids sort last and contribute zero
    order = torch.argsort(torch.where(valid, flat_expert, num_experts), stable=True)
    counts = torch.bincount(flat_expert[valid], minlength=num_experts).tolist()
    x_sorted = hidden_states.index_select(0, order // k)
    weights_sorted = top_k_weights.reshape(-1).index_select(0, order)
    pieces = []
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        h = clamped_swiglu(F.linear(x_sorted[start:end], experts.gate_up_proj[expert]), experts.limit)
        pieces.append(F.linear(h, experts.down_proj[expert]) * weights_sorted[start:end, None].to(h.dtype))
        start = end
    tail = hidden_states.new_zeros((order.numel() - start, hidden_states.shape[1]))
    y_sorted = torch.cat(pieces + [tail]) if pieces else tail
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return y_sorted.index_select(0, inverse).view(num_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)


def _swiglu_weighted_(h: torch.Tensor, limit: float, weights: torch.Tensor) -> torch.Tensor:
    """In place on ``h [S, 2I]``: returns the view ``h[:, :I] = silu(min(g, limit)) * clamp(u) * w``.
    The routing weight is folded in here, before the down projection (which is linear), so the
    [S, H] expert outputs need no extra pass."""
    inter = h.shape[1] // 2
    g, u = h[:, :inter], h[:, inter:]
    g.clamp_(max=limit)
    F.silu(g, inplace=True)
    u.clamp_(min=-limit, max=limit)
    u.mul_(weights[:, None])
    return g.mul_(u)


# at most this many (token, expert) slots: group them in Python (no sort / bincount kernels)
SMALL_SLOTS = 64


# With fewer rows per active expert than this, one grouped_mm call beats the per-expert mm loop
# (measured with benchmarks/moe_cpu.py --variants; grouped_mm allocates its outputs, the loop
# writes into reused scratch, which wins once the GEMMs are large).
GROUPED_MM_MAX_ROWS_PER_EXPERT = {torch.bfloat16: 64, torch.float16: 64, torch.float32: 8}


def _use_grouped_mm(x: torch.Tensor, gate_up: torch.Tensor, rows_per_expert: float) -> bool:
    if not hasattr(F, "grouped_mm") or x.device.type != "cpu" or gate_up.dtype != x.dtype:
        return False
    align = 16 // x.element_size()  # grouped_mm needs 16-byte aligned strides
    return (rows_per_expert < GROUPED_MM_MAX_ROWS_PER_EXPERT.get(x.dtype, 0)
            and x.shape[1] % align == 0 and gate_up.shape[1] % (2 * align) == 0)


# ----------------------------------------------------------------------------- native kernel
# Few rows per expert (decode, small batches) are memory-bound: every hit expert's weights should
# be read once. Native kernels registered by dsv41.kernels (AVX-512 C++, see kernels/cpu_ext.py)
# take calls with at most NATIVE_MAX_ROWS_PER_EXPERT (token, expert) slots per expert on average
# (half that with one thread) and at least NATIVE_MIN_BYTES of hit expert weights (small models
# stay on the PyTorch paths: not worth a build): fn(gate_up, down, x [T, H], top_k_index [T, k],
# top_k_weights [T, k], limit) -> [T, H] or None. The crossover with the mm loop, measured with
# benchmarks/moe_cpu.py --variants on the scaled V4-Flash layer: the native kernel wins up to
# 24 rows per expert (T=256) with 2 threads (1.2-1.4x) but only up to ~12 with one thread.
NATIVE_EXPERTS: list[Callable] = []
NATIVE_MAX_ROWS_PER_EXPERT = 32
NATIVE_MIN_BYTES = 4 * 2**20


def _native_max_rows() -> int:
    return NATIVE_MAX_ROWS_PER_EXPERT if torch.get_num_threads() > 1 else NATIVE_MAX_ROWS_PER_EXPERT // 2


def _native_experts(gate_up, down, x, top_k_index, top_k_weights, limit) -> torch.Tensor | None:
    """Few torch calls on purpose: at one token this is on the decode critical path (the kernels
    check device, dtype and layout themselves and return None when they do not apply)."""
    if not NATIVE_EXPERTS or torch.compiler.is_compiling():
        return None
    num_experts = gate_up.shape[0]
    num_slots = top_k_index.numel()
    if num_slots > _native_max_rows() * num_experts:
        return None
    # hit bytes: gate_up holds 2/3 of every expert's weights
    if min(num_experts, num_slots) * (gate_up.nbytes // num_experts) * 3 // 2 < NATIVE_MIN_BYTES:
        return None
    for native in NATIVE_EXPERTS:
        out = native(gate_up, down, x, top_k_index, top_k_weights, limit)
        if out is not None:
            return out
    return None


# ----------------------------------------------------------------------------- fused decode
# One token without a native kernel: torch's bf16 GEMV runs far below memory bandwidth (about
# 9 GB/s per thread even from cache), so decode uses one gather-and-reduce per projection, compiled
# by Inductor: it reads only the k experts' rows, accumulates in float32 and never materialises the
# gathered weights. Used when the hit experts' weights are at least FUSED_DECODE_MIN_BYTES and
# torch.compile works here (it needs a C++ compiler; on failure the mm loop is used from then on).
# DSV41_CPU_FUSED_DECODE=0 disables it.
FUSED_DECODE = os.environ.get("DSV41_CPU_FUSED_DECODE", "1") != "0"
FUSED_DECODE_MIN_BYTES = 4 * 2**20
_FUSED_DECODE: dict[str, object] = {}


def decode_math(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, limit: float) -> torch.Tensor:
    """One token: ``x [1, H]``, ``top_k_index [1, k]`` (ids outside [0, E) are ignored), weights
    ``[1, k]`` -> ``[1, H]`` in x's dtype, accumulated in float32."""
    num_experts, inter = gate_up.shape[0], down.shape[2]
    idx = top_k_index[0]
    valid = (idx >= 0) & (idx < num_experts)
    idx = torch.where(valid, idx, 0)  # dropped slots read any valid row with weight 0
    w = torch.where(valid, top_k_weights[0].float(), 0.0)
    h = (gate_up[idx].float() * x[0].float()).sum(-1)  # [k, 2I]
    a = F.silu(h[:, :inter].clamp(max=limit)) * h[:, inter:].clamp(-limit, limit) * w[:, None]
    return (down[idx].float() * a[:, None, :]).sum(dim=(0, 2))[None].to(x.dtype)


def _fused_decode(gate_up, down, x, top_k_index, top_k_weights, limit) -> torch.Tensor | None:
    """[1, H] via the compiled :func:`decode_math`, or None when it does not apply."""
    if not FUSED_DECODE or "failed" in _FUSED_DECODE or x.device.type != "cpu" or down.dtype != gate_up.dtype:
        return None
    k = top_k_index.shape[1]
    if k * (gate_up.shape[1] * gate_up.shape[2] + down.shape[1] * down.shape[2]) * gate_up.element_size() < FUSED_DECODE_MIN_BYTES:
        return None
    if torch.compiler.is_compiling():
        return None
    fn = _FUSED_DECODE.get("fn")
    if fn is None:
        fn = _FUSED_DECODE["fn"] = torch.compile(decode_math, dynamic=True)
    try:
        return fn(gate_up, down, x, top_k_index, top_k_weights, float(limit))
    except Exception as exc:  # no C++ compiler, unsupported platform, ...
        import warnings

        _FUSED_DECODE["failed"] = repr(exc)
        warnings.warn(f"dsv41: compiled CPU decode unavailable ({type(exc).__name__}); using the mm loop", stacklevel=2)
        return None


def cpu_grouped_experts(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        gemm: str = "auto"):
    """Sort-based grouped computation (the default on CPU).

    Inference: the (token, expert) slots are grouped by expert (a Python grouping for <= SMALL_SLOTS
    slots, i.e. decode; one sort + searchsorted otherwise), the rows of each expert are gathered once,
    the gate/up and down projections run as grouped GEMMs over all active experts (one
    ``grouped_mm`` call each, or ``mm`` per active expert into preallocated buffers), the clamped
    SwiGLU and the routing weight are applied in place on the [S, I] intermediate, and one
    ``index_add_`` reduces the rows back to tokens. No Python work is done for idle experts.
    Few rows per expert with large experts go to a registered native kernel, else a single token
    takes the compiled fused decode (see above).
    With autograd enabled a plain op-by-op version is used. ``gemm``: auto | grouped_mm | loop."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        # per-expert weight containers (e.g. bitsandbytes-quantized experts): index them one by one
        return reference_experts(experts, hidden_states, top_k_index, top_k_weights)
    if torch.is_grad_enabled() and (hidden_states.requires_grad or gate_up.requires_grad or down.requires_grad):
        return _grouped_autograd(experts, hidden_states, top_k_index, top_k_weights)
    num_tokens, k = top_k_index.shape
    if gemm == "auto" and num_tokens * k:
        native = _native_experts(gate_up, down, hidden_states, top_k_index, top_k_weights, experts.limit)
        if native is not None:
            return native  # already in hidden_states' dtype
    if num_tokens == 1 and k and gemm == "auto":
        fused = _fused_decode(gate_up, down, hidden_states, top_k_index, top_k_weights, experts.limit)
        if fused is not None:
            return fused
    num_experts, hidden = gate_up.shape[0], hidden_states.shape[1]
    x = hidden_states if gate_up.dtype == hidden_states.dtype else hidden_states.to(gate_up.dtype)
    out = torch.zeros((num_tokens, hidden), dtype=x.dtype, device=x.device)
    num_slots = num_tokens * k
    if num_slots == 0:
        return out.to(hidden_states.dtype)
    flat_w = top_k_weights.reshape(-1)
    if num_slots <= SMALL_SLOTS:
        groups: dict[int, list[int]] = {}
        for slot, e in enumerate(top_k_index.reshape(-1).tolist()):
            if 0 <= e < num_experts:
                groups.setdefault(e, []).append(slot)
        if not groups:
            return out.to(hidden_states.dtype)
        order = [slot for slots in groups.values() for slot in slots]
        order_t = torch.tensor(order, device=x.device)
        token_t = order_t // k
        runs = []
        start = 0
        for e, slots in groups.items():
            runs.append((e, start, start + len(slots)))
            start += len(slots)
        h = torch.empty((len(order), gate_up.shape[1]), dtype=x.dtype, device=x.device)
        for e, a, b in runs:
            xa = x[order[a] // k : order[a] // k + 1] if b - a == 1 else x.index_select(0, token_t[a:b])
            torch.mm(xa, gate_up[e].t(), out=h[a:b])
        hh = _swiglu_weighted_(h, experts.limit, flat_w.index_select(0, order_t).to(x.dtype))
        y = torch.empty((len(order), hidden), dtype=x.dtype, device=x.device)
        for e, a, b in runs:
            torch.mm(hh[a:b], down[e].t(), out=y[a:b])
        if num_tokens == 1:
            return y.sum(dim=0, keepdim=True).to(hidden_states.dtype)
        return out.index_add_(0, token_t, y).to(hidden_states.dtype)

    flat = top_k_index.reshape(-1)
    sorted_e, order = torch.sort(flat)
    # run boundaries of experts 0..E-1; ids < 0 sort before bounds[0], ids >= E after bounds[E]
    bounds_t = torch.searchsorted(sorted_e, torch.arange(num_experts + 1, device=flat.device, dtype=sorted_e.dtype))
    bounds = bounds_t.tolist()
    first, last = bounds[0], bounds[-1]
    if last == first:
        return out.to(hidden_states.dtype)
    order = order[first:last]
    token_t = order // k
    rows = last - first
    xs = torch.index_select(x, 0, token_t, out=_scratch("xs", (rows, hidden), x.dtype, x.device))
    ws = flat_w.index_select(0, order).to(x.dtype)
    active = [(e, bounds[e] - first, bounds[e + 1] - first) for e in range(num_experts) if bounds[e + 1] > bounds[e]]
    use_gmm = _use_grouped_mm(x, gate_up, rows / len(active)) if gemm == "auto" else gemm == "grouped_mm"
    if use_gmm:
        offs = (bounds_t[1:] - first).to(torch.int32)
        h = F.grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
        hh = _swiglu_weighted_(h, experts.limit, ws)
        y = F.grouped_mm(hh, down.transpose(1, 2), offs=offs)
    else:
        h = _scratch("h", (rows, gate_up.shape[1]), x.dtype, x.device)
        for e, a, b in active:
            torch.mm(xs[a:b], gate_up[e].t(), out=h[a:b])
        hh = _swiglu_weighted_(h, experts.limit, ws)
        y = _scratch("y", (rows, hidden), x.dtype, x.device)
        for e, a, b in active:
            torch.mm(hh[a:b], down[e].t(), out=y[a:b])
    return out.index_add_(0, token_t, y).to(hidden_states.dtype)


MOE_BACKENDS: dict[str, Callable] = {
    "reference": reference_experts,
    "cpu_grouped": cpu_grouped_experts,
}


def available_backends() -> list[str]:
    _try_register_kernels()
    return sorted(MOE_BACKENDS)


def _try_register_kernels() -> None:
    """Import dsv41.kernels (if installed) so that its GPU backends register themselves."""
    try:
        import dsv41.kernels  # noqa: F401
    except ImportError:
        pass


def resolve_backend(name: str, device: torch.device) -> str:
    """Map ``auto`` to the best backend available for ``device``; validate explicit names."""
    if name == "auto":
        _try_register_kernels()  # GPU backends, and the native CPU decode kernel
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if candidate in MOE_BACKENDS:
                    return candidate
        return "cpu_grouped"
    if name not in MOE_BACKENDS:
        _try_register_kernels()
    if name not in MOE_BACKENDS:
        raise ValueError(
            f"moe_backend={name!r} is not available; choose one of {sorted(MOE_BACKENDS) + ['auto']} "
            "(triton/cuda need a CUDA machine and the dsv41 package installed)"
        )
    return name
