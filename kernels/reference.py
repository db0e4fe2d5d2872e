"""PyTorch references for every kernel in :mod:`dsv41.kernels` (the semantics the Triton and CUDA
versions are tested against), plus the weight formats used by the quantized expert kernels.

Routing
    ``route_reference``: scores = f(logits) with f in {sqrtsoftplus, sigmoid, softmax}; the top-k
    experts are chosen on ``scores + e_score_correction_bias``; the weights are the *unbiased*
    scores of those experts, optionally normalised to sum 1, then multiplied by
    ``routed_scaling_factor``. Hash routing takes the experts from ``tid2eid[input_ids]`` instead.

Alignment (token permutation)
    ``align_reference``: the T*k (token, expert) slots (slot s = token * k + j) are grouped by
    expert into blocks of ``block_m`` rows, each expert's run padded to a multiple of ``block_m``.
    Within an expert, slots keep increasing slot order (the Triton and CUDA versions reproduce
    this order exactly). Slots whose expert id is outside [0, E) are dropped.

Quantized weight formats (the DeepSeek layouts, see ``dsv41.quantization.codecs``)
    FP8 block: ``float8_e4m3fn [E, N, K]`` + float32 ``scale_inv [E, ceil(N/128), ceil(K/128)]``,
    W = q * scale_inv per 128x128 block.
    MXFP4: ``uint8 [E, N, K/2]`` two e2m1 codes per byte (low nibble = even k) + ue8m0 scale bytes
    ``uint8 [E, N, K/32]``, W = e2m1(code) * 2**(byte - 127).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
FP8_BLOCK = 128
MX_GROUP = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


# ----------------------------------------------------------------------------------- routing


def score_fn(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    logits = logits.float()
    if scoring_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits)
    if scoring_func == "softmax":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")


def route_reference(
    logits: torch.Tensor,
    top_k: int,
    scoring_func: str = "sqrtsoftplus",
    bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    renormalize: bool = True,
    input_ids: torch.Tensor | None = None,
    tid2eid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [T, E]`` -> (``weights [T, k]`` float32, ``indices [T, k]`` int64).

    With ``tid2eid`` (hash routing) the experts are ``tid2eid[input_ids]`` and ``bias`` is unused."""
    scores = score_fn(logits, scoring_func)
    if tid2eid is not None:
        if input_ids is None:
            raise ValueError("hash routing needs input_ids together with tid2eid")
        indices = tid2eid[input_ids.reshape(-1)].long()
    else:
        biased = scores if bias is None else scores + bias.float()
        indices = torch.topk(biased, top_k, dim=-1, sorted=True).indices
    weights = scores.gather(1, indices)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


# --------------------------------------------------------------------------------- alignment


@dataclass
class Alignment:
    """Result of the alignment step (all int32, on the device of the routing ids).

    sorted_ids       [capacity]        slot index per padded row; ``num_slots`` marks padding
    block_expert     [capacity/block_m] expert of each row block; -1 past ``num_padded``
    num_padded       [1]                rows in use (sum of the padded per-expert counts)
    slot_pos         [num_slots]        inverse permutation: row of each slot, -1 if dropped
    counts           [E]                slots per expert (unpadded)
    """

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_padded: torch.Tensor
    slot_pos: torch.Tensor
    counts: torch.Tensor
    block_m: int

    @property
    def capacity(self) -> int:
        return self.sorted_ids.numel()


def align_capacity(num_slots: int, num_experts: int, block_m: int) -> int:
    """Rows needed in the worst case without a device->host sync: every non-empty expert (at most
    min(E, slots)) wastes at most block_m - 1 padding rows."""
    rows = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return max(block_m, math.ceil(rows / block_m) * block_m)


def align_reference(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    flat = top_k_index.reshape(-1).long()
    num_slots = flat.numel()
    device = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    capacity = align_capacity(num_slots, num_experts, block_m)
    sorted_ids = torch.full((capacity,), num_slots, dtype=torch.int32, device=device)
    slot_pos = torch.full((num_slots,), -1, dtype=torch.int32, device=device)
    key = torch.where(valid, flat, num_experts)
    order = torch.argsort(key, stable=True)
    n_valid = int(valid.sum())
    order = order[:n_valid]
    expert_sorted = flat[order]
    # rank of each sorted slot inside its expert's run
    run_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n_valid, device=device) - run_start[expert_sorted]
    pos = starts[expert_sorted] + rank
    sorted_ids[pos] = order.to(torch.int32)
    slot_pos[order] = pos.to(torch.int32)
    n_blocks = capacity // block_m
    block_expert = torch.full((n_blocks,), -1, dtype=torch.int32, device=device)
    ends = torch.cumsum(padded, 0)
    total = int(ends[-1]) if num_experts else 0
    blocks = torch.arange(total // block_m, device=device)
    block_expert[: total // block_m] = torch.searchsorted(ends, blocks * block_m, right=True).to(torch.int32)
    return Alignment(
        sorted_ids=sorted_ids,
        block_expert=block_expert,
        num_padded=torch.tensor([total], dtype=torch.int32, device=device),
        slot_pos=slot_pos,
        counts=counts.to(torch.int32),
        block_m=block_m,
    )


# ------------------------------------------------------------------------ quantized weights


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` -> (``float8_e4m3fn [..., N, K]``, float32 ``scale_inv [..., ceil(N/b), ceil(K/b)]``)."""
    *lead, n, k = w.shape
    pn, pk = (-n) % block, (-k) % block
    x = F.pad(w.float(), (0, pk, 0, pn)).reshape(*lead, (n + pn) // block, block, (k + pk) // block, block)
    amax = x.abs().amax(dim=(-3, -1)).clamp_min(1e-12)
    scale = amax / 448.0
    q = (x / scale[..., :, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    q = q.reshape(*lead, n + pn, k + pk)[..., :n, :k].contiguous()
    return q, scale.contiguous()


def dequantize_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    n, k = q.shape[-2:]
    s = scale_inv.float().repeat_interleave(block, -2)[..., :n, :].repeat_interleave(block, -1)[..., :k]
    return q.float() * s


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` (K multiple of 32) -> (``uint8 [..., N, K/2]``, ue8m0 bytes ``uint8 [..., N, K/32]``)."""
    *lead, n, k = w.shape
    if k % MX_GROUP:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {MX_GROUP}, got {k}")
    g = w.float().reshape(*lead, n, k // MX_GROUP, MX_GROUP)
    amax = g.abs().amax(-1).clamp_min(2.0**-120)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)[..., None]
    lut = torch.tensor(E2M1_VALUES[:8], device=w.device)
    mag = (scaled.abs()[..., None] - lut).abs().argmin(-1).to(torch.uint8)
    codes = (mag | (scaled < 0).to(torch.uint8) << 3).reshape(*lead, n, k)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    return packed, (exp + 127).to(torch.uint8).contiguous()


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    u = packed.view(torch.uint8)
    codes = torch.stack((u & 0xF, u >> 4), dim=-1).reshape(*u.shape[:-1], u.shape[-1] * 2)
    vals = torch.tensor(E2M1_VALUES, device=packed.device)[codes.long()]
    s = torch.exp2(scale.view(torch.uint8).float() - 127).repeat_interleave(MX_GROUP, -1)
    return vals * s


def _scale_f32(s: torch.Tensor) -> torch.Tensor:
    """FP8 block scales stored as float or as ue8m0 (float8_e8m0fnu / raw bytes) -> float32."""
    if s.dtype == torch.uint8 or s.dtype == getattr(torch, "float8_e8m0fnu", None):
        return torch.exp2(s.view(torch.uint8).float() - 127)
    return s.float()


class QuantizedExperts:
    """Expert weights in a quantized format, with the attributes the experts interface reads.

    ``fmt`` is ``"fp8"`` or ``"mxfp4"``; ``gate_up_q``/``down_q`` hold the codes and
    ``gate_up_scale``/``down_scale`` the scales (float32 for fp8, ue8m0 bytes for mxfp4)."""

    def __init__(self, fmt: str, gate_up_q, gate_up_scale, down_q, down_scale, limit: float, hidden: int, inter: int):
        if fmt not in ("fp8", "mxfp4"):
            raise ValueError(f"quantized expert format must be 'fp8' or 'mxfp4', got {fmt!r}")
        self.fmt = fmt
        self.gate_up_q, self.gate_up_scale = gate_up_q, gate_up_scale
        self.down_q, self.down_scale = down_q, down_scale
        self.limit = limit
        self.hidden_dim, self.intermediate_dim = hidden, inter
        self.num_experts = gate_up_q.shape[0]

    @classmethod
    def from_dense(cls, fmt: str, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, limit: float) -> "QuantizedExperts":
        quant = quantize_fp8_block if fmt == "fp8" else quantize_mxfp4
        gq, gs = quant(gate_up_proj.detach())
        dq, ds = quant(down_proj.detach())
        return cls(fmt, gq, gs, dq, ds, limit, down_proj.shape[1], down_proj.shape[2])

    def to(self, device) -> "QuantizedExperts":
        return QuantizedExperts(
            self.fmt, self.gate_up_q.to(device), self.gate_up_scale.to(device), self.down_q.to(device),
            self.down_scale.to(device), self.limit, self.hidden_dim, self.intermediate_dim,
        )

    def dequantized(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fmt == "fp8":
            return (dequantize_fp8_block(self.gate_up_q, _scale_f32(self.gate_up_scale)).to(dtype),
                    dequantize_fp8_block(self.down_q, _scale_f32(self.down_scale)).to(dtype))
        return (dequantize_mxfp4(self.gate_up_q, self.gate_up_scale).to(dtype),
                dequantize_mxfp4(self.down_q, self.down_scale).to(dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_up_q, self.gate_up_scale, self.down_q, self.down_scale))
