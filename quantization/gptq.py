"""GPTQ (Frantar et al., 2022): int4 weight quantization with Hessian-based error compensation.

Two levels:

* :func:`gptq_quantize_weight` — one weight matrix ``W [R, C]`` and the Hessian ``H = 2/n X^T X``
  of its inputs ``X [n, C]``; columns are quantized left to right and each column's rounding
  error is spread over the not-yet-quantized columns through the inverse Hessian (Cholesky form),
  minimising ``||X W^T - X Q^T||``. Same grid as RTN (symmetric, float16 group scales).
* :func:`collect_hessians` — a model-level pass: decoder layers are processed in order; for each
  layer, forward hooks capture the inputs of every quantizable linear and every routed expert
  (tokens routed to that expert), the layer's weights are GPTQ-quantized in place (fake
  quantization) so that later layers see the quantized activations, and the Hessians are
  returned keyed by the official checkpoint tensor name for the checkpoint writer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .codecs import QuantizationError, int_qrange, int_scales, resolve_group_size
from .names import hf_to_official, is_quantizable_linear


def gptq_quantize_weight(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 32,
    damp: float = 0.01,
    block_size: int = 128,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (``int8`` codes ``[R, C]`` in the bit width's range, float16 scales ``[R, C/g]``).

    Rows are independent, so callers may pass any subset of rows with the same Hessian."""
    if w.dim() != 2:
        raise QuantizationError(f"GPTQ weight {name!r}: expected a 2-D matrix, found shape {list(w.shape)}")
    rows, cols = w.shape
    if tuple(hessian.shape) != (cols, cols):
        raise QuantizationError(
            f"GPTQ weight {name!r}: Hessian shape expected [{cols}, {cols}], found {list(hessian.shape)}"
        )
    lo, hi = int_qrange(bits)
    g = resolve_group_size(cols, group_size, name)
    # Blocks hold whole groups so that a group's scale is taken from fully updated columns.
    blk = g * max(1, block_size // g)
    W = w.to(torch.float32).clone()
    H = hessian.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(cols) * (damp * torch.mean(torch.diag(H)).clamp_min(1e-8))
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise QuantizationError(f"GPTQ weight {name!r}: Hessian is not positive definite even after dampening")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    codes = torch.zeros(rows, cols, dtype=torch.int8)
    scales = torch.zeros(rows, cols // g, dtype=torch.float16)
    for i1 in range(0, cols, blk):
        i2 = min(i1 + blk, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        s = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                s16 = int_scales(W1[:, i : i + g].reshape(rows, 1, g), bits)[:, 0]
                scales[:, col // g] = s16
                s = s16.to(torch.float32)
            wcol = W1[:, i]
            q = torch.round(wcol / s).clamp(lo, hi)
            codes[:, col] = q.to(torch.int8)
            err = (wcol - q * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return codes, scales


def gptq_quantize_grouped(
    w: torch.Tensor, hessians: torch.Tensor, bits: int = 4, group_size: int = 32, damp: float = 0.01, name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ for a block-diagonal grouped projection: ``hessians [g, C, C]``, row block ``j`` (of
    ``R/g`` rows) is compensated with ``hessians[j]``."""
    n = hessians.shape[0]
    if w.shape[0] % n:
        raise QuantizationError(f"GPTQ weight {name!r}: {w.shape[0]} rows do not split into {n} groups")
    rg = w.shape[0] // n
    parts = [gptq_quantize_weight(w[j * rg : (j + 1) * rg], hessians[j], bits, group_size, damp, name=name) for j in range(n)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class HessianAccumulator:
    """Running ``H = 2/n sum x x^T`` for one weight (float32 accumulation)."""

    def __init__(self, cols: int):
        self.H = torch.zeros(cols, cols, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if x.shape[0] == 0:
            return
        total = self.n + x.shape[0]
        self.H *= self.n / total
        x = x * (2.0 / total) ** 0.5
        self.H += x.T @ x
        self.n = total


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    for prefix in ("model.layers", "layers", "transformer.h"):
        mod = model
        ok = True
        for part in prefix.split("."):
            if not hasattr(mod, part):
                ok = False
                break
            mod = getattr(mod, part)
        if ok and isinstance(mod, (nn.ModuleList, list)):
            return [(f"{prefix}.{i}", layer) for i, layer in enumerate(mod)]
    raise QuantizationError("GPTQ: the model has no decoder layer list (expected model.layers or layers)")


class _StopForward(Exception):
    pass


def _experts_call_args(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    if any(v is None for v in vals):
        raise QuantizationError(
            "GPTQ: the experts module must be called as experts(hidden_states, top_k_index, top_k_weights)"
        )
    return vals


def _swiglu(gate_up: torch.Tensor, limit: float | None) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    bits: int = 4,
    group_size: int = 32,
    damp: float = 0.01,
    progress=None,
) -> dict[str, torch.Tensor]:
    """Sequential GPTQ over the decoder layers of ``model`` (modified in place: its quantizable
    weights become their GPTQ fake-quantized values). ``batches`` are ``input_ids [B, T]`` tensors.

    Returns ``{official checkpoint tensor name: Hessian}`` for every quantized weight; expert
    weights ``experts.E.w1/w3`` (inputs: tokens routed to E) and ``w2`` (inputs: the expert's
    SwiGLU activations) each get their own Hessian."""
    batches = list(batches)
    if not batches:
        raise QuantizationError("GPTQ needs at least one calibration batch")
    model.eval()
    hessians: dict[str, torch.Tensor] = {}
    for layer_name, layer in _decoder_layers(model):
        acc: dict[str, HessianAccumulator] = {}
        targets: dict[str, tuple[nn.Module, str]] = {}
        handles = []
        for sub_name, mod in layer.named_modules():
            full = f"{layer_name}.{sub_name}" if sub_name else layer_name
            if isinstance(mod, nn.Linear) and is_quantizable_linear(hf_to_official(f"{full}.weight"), mod.weight.shape):
                key = f"{full}.weight"
                targets[key] = (mod, "linear")

                def pre_hook(m, args, key=key):
                    x = args[0]
                    acc.setdefault(key, HessianAccumulator(x.shape[-1])).add(x.detach())

                handles.append(mod.register_forward_pre_hook(pre_hook))
            elif (
                not isinstance(mod, nn.Linear)
                and isinstance(getattr(mod, "n_groups", None), int)
                and isinstance(getattr(mod, "weight", None), torch.Tensor)
                and mod.weight.dim() == 2
                and is_quantizable_linear(hf_to_official(f"{full}.weight"), mod.weight.shape)
            ):
                # block-diagonal grouped projection: input [..., g, in]; row block j sees x[..., j, :]
                key = f"{full}.weight"
                targets[key] = (mod, "grouped")

                def grouped_hook(m, args, key=key):
                    x = args[0]
                    for j in range(m.n_groups):
                        acc.setdefault(f"{key}#{j}", HessianAccumulator(x.shape[-1])).add(x[..., j, :].detach())

                handles.append(mod.register_forward_pre_hook(grouped_hook))
            elif isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor) and getattr(mod, "gate_up_proj").dim() == 3:
                targets[full] = (mod, "experts")

                def experts_hook(m, args, kwargs, full=full):
                    hs, idx, _ = _experts_call_args(args, kwargs)
                    hs = hs.reshape(-1, hs.shape[-1])
                    idx = idx.reshape(hs.shape[0], -1)
                    limit = getattr(m, "limit", None)
                    for e in torch.unique(idx).tolist():
                        if e < 0 or e >= m.gate_up_proj.shape[0]:
                            continue
                        tok = (idx == e).any(dim=-1).nonzero().squeeze(-1)
                        x = hs[tok]
                        acc.setdefault(f"{full}.{e}.in", HessianAccumulator(x.shape[-1])).add(x)
                        h = _swiglu(F.linear(x, m.gate_up_proj[e]), limit)
                        acc.setdefault(f"{full}.{e}.mid", HessianAccumulator(h.shape[-1])).add(h)

                handles.append(mod.register_forward_pre_hook(experts_hook, with_kwargs=True))
        if not targets:
            continue

        def stop_hook(m, args, out):
            raise _StopForward

        handles.append(layer.register_forward_hook(stop_hook))
        try:
            for ids in batches:
                try:
                    model(input_ids=ids)
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()

        for key, (mod, kind) in targets.items():
            if kind == "linear":
                if key not in acc:
                    continue  # never reached (e.g. a branch unused by these inputs)
                H = acc[key].H
                codes, scales = gptq_quantize_weight(mod.weight.data, H, bits, group_size, damp, name=key)
                mod.weight.data.copy_(_dequant(codes, scales).to(mod.weight.dtype))
                hessians[hf_to_official(key)] = H
                continue
            if kind == "grouped":
                if f"{key}#0" not in acc:
                    continue
                Hs = torch.stack([acc[f"{key}#{j}"].H for j in range(mod.n_groups)])
                codes, scales = gptq_quantize_grouped(mod.weight.data, Hs, bits, group_size, damp, name=key)
                mod.weight.data.copy_(_dequant(codes, scales).to(mod.weight.dtype))
                hessians[hf_to_official(key)] = Hs
                continue
            n_exp, two_i, _ = mod.gate_up_proj.shape
            inter = two_i // 2
            for e in range(n_exp):
                if f"{key}.{e}.in" not in acc:
                    continue  # expert received no calibration token: the writer falls back to RTN
                H_in, H_mid = acc[f"{key}.{e}.in"].H, acc[f"{key}.{e}.mid"].H
                gu = mod.gate_up_proj.data[e]
                for part, rows in (("w1", slice(0, inter)), ("w3", slice(inter, two_i))):
                    oname = hf_to_official(f"{key}.{e}.{part}.weight")
                    codes, scales = gptq_quantize_weight(gu[rows], H_in, bits, group_size, damp, name=oname)
                    gu[rows] = _dequant(codes, scales).to(gu.dtype)
                    hessians[oname] = H_in
                oname = hf_to_official(f"{key}.{e}.w2.weight")
                codes, scales = gptq_quantize_weight(mod.down_proj.data[e], H_mid, bits, group_size, damp, name=oname)
                mod.down_proj.data[e] = _dequant(codes, scales).to(mod.down_proj.dtype)
                hessians[oname] = H_mid
        if progress is not None:
            progress(layer_name, len(hessians))
    return hessians


def _dequant(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    ng = scales.shape[-1]
    return (codes.to(torch.float32).reshape(rows, ng, cols // ng) * scales.to(torch.float32)[..., None]).reshape(rows, cols)
