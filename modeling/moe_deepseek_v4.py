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

from collections.abc import Callable

import torch
import torch.nn.functional as F


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


def cpu_grouped_experts(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Sort-based grouped computation: the T*k (token, expert) slots are sorted by expert once, each
    active expert runs its two GEMMs on one contiguous run of rows, and the results are gathered
    back into slot order and summed over k (no scatter-add, no Python work for idle experts)."""
    num_tokens, k = top_k_index.shape
    num_experts = experts.gate_up_proj.shape[0]
    flat_expert = top_k_index.reshape(-1)
    valid = (flat_expert >= 0) & (flat_expert < num_experts)
    # invalid ids sort last and contribute zero
    order = torch.argsort(torch.where(valid, flat_expert, num_experts), stable=True)
    counts = torch.bincount(flat_expert[valid], minlength=num_experts).tolist()
    token_of_slot = order // k
    x_sorted = hidden_states.index_select(0, token_of_slot)
    weights_sorted = top_k_weights.reshape(-1).index_select(0, order)
    track_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or experts.gate_up_proj.requires_grad)
    y_sorted = hidden_states.new_zeros(x_sorted.shape) if not track_grad else None
    pieces = []
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        h = clamped_swiglu(F.linear(x_sorted[start:end], experts.gate_up_proj[expert]), experts.limit)
        y = F.linear(h, experts.down_proj[expert]) * weights_sorted[start:end, None].to(h.dtype)
        if track_grad:
            pieces.append(y)
        else:
            y_sorted[start:end] = y
        start = end
    if track_grad:
        tail = hidden_states.new_zeros((order.numel() - start, hidden_states.shape[1]))
        y_sorted = torch.cat(pieces + [tail]) if pieces else tail
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return y_sorted.index_select(0, inverse).view(num_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)


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
        if device.type == "cuda":
            _try_register_kernels()
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
