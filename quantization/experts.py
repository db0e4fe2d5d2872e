"""Routed experts kept in their checkpoint format (FP8 128x128 blocks or FP4 e2m1 + ue8m0 per 32).

:class:`DeepseekV4QuantizedExperts` replaces a layer's dense ``DeepseekV4Experts`` when a quantized
checkpoint is loaded with ``quantized_experts="keep"`` (or ``"auto"`` with the Triton backend).
It holds the codes and scales as buffers, in the layout the Triton grouped GEMMs read
(``dsv41.kernels.triton_moe``), so the weights are dequantized inside the kernel:

* FP8: ``gate_up_q [E, 2*P, H]`` float8_e4m3fn with float32 ``gate_up_scale [E, 2*P/128, ceil(H/128)]``,
  where w1 fills rows ``[0, I)`` and w3 rows ``[P, P+I)``, ``P = ceil(I/128)*128`` (``up_offset``), so
  each projection keeps its own 128-row scale blocks exactly as stored; ``down_q [E, H, I]``.
* FP4: ``gate_up_q [E, 2I, H/2]`` uint8 (two e2m1 codes per byte, low nibble = even column) with
  ue8m0 bytes ``gate_up_scale [E, 2I, H/32]``; ``down_q [E, H, I/2]``.

With any other backend (CPU) the experts hit by the current tokens are dequantized on the fly and
run through the plain PyTorch path, so a CPU model stays at the quantized size in memory.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from dsv41.modeling.modeling_deepseek_v4 import DeepseekV4Experts
from dsv41.modeling.moe_deepseek_v4 import MOE_BACKENDS

from . import codecs as C

#: the kernels' FP8 scale block (rows x columns)
KERNEL_FP8_BLOCK = 128
#: backends that read quantized expert weights directly
QUANTIZED_KERNEL_BACKENDS = ("triton",)


class DeepseekV4QuantizedExperts(DeepseekV4Experts):
    """Drop-in for ``DeepseekV4Experts`` holding FP8 or FP4 expert weights (see module docstring)."""

    def __init__(self, fmt: str, num_experts: int, hidden: int, inter: int, limit: float, device=None):
        nn.Module.__init__(self)
        if fmt not in ("fp8", "mxfp4"):
            raise ValueError(f"quantized experts: format must be 'fp8' or 'mxfp4', got {fmt!r}")
        self.fmt, self.num_experts, self.limit = fmt, num_experts, limit
        self.hidden_dim, self.intermediate_dim = hidden, inter
        self.backend = "reference"
        b = KERNEL_FP8_BLOCK
        if fmt == "fp8":
            self.up_offset = math.ceil(inter / b) * b
            shapes = {
                "gate_up_q": ((num_experts, 2 * self.up_offset, hidden), C.FP8_DTYPE),
                "gate_up_scale": ((num_experts, 2 * self.up_offset // b, math.ceil(hidden / b)), torch.float32),
                "down_q": ((num_experts, hidden, inter), C.FP8_DTYPE),
                "down_scale": ((num_experts, math.ceil(hidden / b), math.ceil(inter / b)), torch.float32),
            }
        else:
            if hidden % C.MX_GROUP or inter % C.MX_GROUP:
                raise ValueError(f"FP4 experts need hidden ({hidden}) and intermediate ({inter}) sizes divisible by 32")
            self.up_offset = inter
            shapes = {
                "gate_up_q": ((num_experts, 2 * inter, hidden // 2), torch.uint8),
                "gate_up_scale": ((num_experts, 2 * inter, hidden // C.MX_GROUP), torch.uint8),
                "down_q": ((num_experts, hidden, inter // 2), torch.uint8),
                "down_scale": ((num_experts, hidden, inter // C.MX_GROUP), torch.uint8),
            }
        for name, (shape, dtype) in shapes.items():
            # zeros: padding rows of the FP8 gate/up layout must hold finite values
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))

    # ---------------------------------------------------------------- filling from a checkpoint

    def set_expert(self, expert: int, proj: str, q: torch.Tensor, scale: torch.Tensor, tensor_name: str) -> None:
        """Copy one checkpoint tensor (``proj`` = w1 | w2 | w3 of ``expert``) with its stored scale."""
        if not 0 <= expert < self.num_experts:
            raise C.QuantizationError(f"tensor {tensor_name!r}: expert {expert} out of range [0, {self.num_experts})")
        inter, p = self.intermediate_dim, self.up_offset
        if self.fmt == "fp8":
            s = C.scale_to_float(scale)
            sb = math.ceil(inter / KERNEL_FP8_BLOCK)
            if proj == "w2":
                dst_q, dst_s = self.down_q[expert], self.down_scale[expert]
            else:
                r0 = 0 if proj == "w1" else p
                dst_q = self.gate_up_q[expert, r0 : r0 + inter]
                dst_s = self.gate_up_scale[expert, r0 // KERNEL_FP8_BLOCK : r0 // KERNEL_FP8_BLOCK + sb]
        else:
            q, s = q.view(torch.uint8), _ue8m0_bytes(scale, tensor_name)
            if proj == "w2":
                dst_q, dst_s = self.down_q[expert], self.down_scale[expert]
            else:
                r0 = 0 if proj == "w1" else inter
                dst_q, dst_s = self.gate_up_q[expert, r0 : r0 + inter], self.gate_up_scale[expert, r0 : r0 + inter]
        for dst, src, what in ((dst_q, q, "weight"), (dst_s, s, "scale")):
            if tuple(dst.shape) != tuple(src.shape):
                raise C.QuantizationError(
                    f"tensor {tensor_name!r}: {self.fmt} {what} shape expected {list(dst.shape)}, found {list(src.shape)}"
                )
            dst.copy_(src)

    # ---------------------------------------------------------------- compute

    def dequantized(self, experts: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        """(gate_up [e, 2I, H], down [e, H, I]) of ``experts`` (all when None), dequantized."""
        sel = (lambda t: t) if experts is None else (lambda t: t.index_select(0, experts))
        inter, p = self.intermediate_dim, self.up_offset
        if self.fmt == "fp8":
            blk = (KERNEL_FP8_BLOCK, KERNEL_FP8_BLOCK)
            gu = C.dequantize_fp8_block(sel(self.gate_up_q), sel(self.gate_up_scale), dtype, "gate_up_q", blk)
            gu = torch.cat((gu[:, :inter], gu[:, p : p + inter]), dim=1)
            dn = C.dequantize_fp8_block(sel(self.down_q), sel(self.down_scale), dtype, "down_q", blk)
        else:
            gu = C.dequantize_mxfp4(sel(self.gate_up_q), sel(self.gate_up_scale), dtype, "gate_up_q")
            dn = C.dequantize_mxfp4(sel(self.down_q), sel(self.down_scale), dtype, "down_q")
        return gu, dn

    def forward(self, hidden, top_k_index, top_k_weights):
        if self.backend in QUANTIZED_KERNEL_BACKENDS and self.backend in MOE_BACKENDS:
            return MOE_BACKENDS[self.backend](self, hidden, top_k_index, top_k_weights)
        # CPU (or a backend without quantized kernels): dequantize only the experts hit
        valid = (top_k_index >= 0) & (top_k_index < self.num_experts)
        hit = torch.unique(top_k_index[valid])
        remap = torch.full((self.num_experts,), -1, dtype=top_k_index.dtype, device=top_k_index.device)
        remap[hit] = torch.arange(hit.numel(), dtype=top_k_index.dtype, device=top_k_index.device)
        local = torch.where(valid, remap[top_k_index.clamp(0, self.num_experts - 1)], torch.full_like(top_k_index, -1))
        gu, dn = self.dequantized(hit, hidden.dtype)
        dense = SimpleNamespace(gate_up_proj=gu, down_proj=dn, limit=self.limit, num_experts=hit.numel())
        fn = MOE_BACKENDS["reference" if self.backend == "reference" else "cpu_grouped"]
        return fn(dense, hidden, local, top_k_weights)

    def _apply(self, fn, recurse=True):
        """``model.to(device)`` moves the codes and scales; ``model.to(dtype)`` / ``.half()`` leave
        their storage formats alone (the activations follow the model's dtype)."""
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(device=moved.device)
        return self

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}, num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"


def _ue8m0_bytes(scale: torch.Tensor, name: str) -> torch.Tensor:
    """FP4 scales as raw ue8m0 bytes; float scales must be exact powers of two."""
    if scale.dtype in (C.UE8M0_DTYPE, torch.uint8):
        return scale.view(torch.uint8)
    s = scale.to(torch.float32)
    mant, exp = torch.frexp(s)
    if not bool(((mant == 0.5) & (s > 0)).all()):
        raise C.QuantizationError(f"tensor {name!r}: FP4 scales must be powers of two (ue8m0) to stay quantized")
    return (exp - 1 + C.UE8M0_BIAS).clamp(0, 254).to(torch.uint8)


def fp8_block_fits_kernel(rows: int, cols: int, block: tuple[int, int] | None, scale_shape) -> bool:
    """Whether a stored FP8 scale grid is the kernels' 128x128 grid (one block per dimension also
    fits when the dimension is at most 128)."""
    if block is None:
        return False
    for n, b, nb in ((rows, block[0], scale_shape[-2]), (cols, block[1], scale_shape[-1])):
        if nb != math.ceil(n / KERNEL_FP8_BLOCK) or not (b == KERNEL_FP8_BLOCK or (nb == 1 and n <= KERNEL_FP8_BLOCK)):
            return False
    return True
