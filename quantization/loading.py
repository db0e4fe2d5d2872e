"""Loading any supported checkpoint format into our model.

:func:`load_quantized_model` is what ``DeepseekV4ForCausalLM.from_pretrained`` calls when the
folder's config.json carries a ``quantization_config``: the model is built from the config
(without the quantization config), then every checkpoint tensor is read, dequantized and copied
into its parameter one at a time, so the peak memory is the model plus one tensor. FP8 / FP4
routed experts can instead stay in their stored format (:mod:`dsv41.quantization.experts`), read
by the Triton kernels on GPU or dequantized per call on CPU. Official, mixed (``model.`` prefix)
and in-memory namings are all accepted.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from .checkpoint import iter_checkpoint_tensors
from .codecs import QuantizationError
from .names import canonical

_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")
_IGNORE = re.compile(r"(^|\.)mtp\.")
logger = logging.getLogger(__name__)


def _official_to_memory(name: str) -> str | None:
    """Official (or mixed) name -> in-memory name, via the modeling's own table; None if unknown."""
    from dsv41.modeling.checkpoint_deepseek_v4 import from_official

    if name.startswith("model.layers.") or name.startswith("model."):
        stripped = canonical(name)
    else:
        stripped = name
    for candidate in (stripped, name):
        try:
            (out,) = from_official({candidate: torch.empty(0)}).keys()
            return out
        except KeyError:
            continue
    return None


QUANTIZED_EXPERTS_MODES = ("auto", "keep", "dequantize")


def _expert_layers_to_keep(path: Path, mode: str, backend: str) -> dict[int, str]:
    """``{layer: "fp8" | "mxfp4"}`` for the MoE layers whose routed experts stay quantized.

    ``keep``: every quantized routed-expert tensor must be FP8 on 128x128 blocks or FP4 (else an
    error naming the tensor); ``auto``: keep them only when ``backend`` has quantized kernels
    (Triton), and dequantize any layer that does not fit; ``dequantize``: keep nothing."""
    from .experts import QUANTIZED_KERNEL_BACKENDS, fp8_block_fits_kernel

    if mode not in QUANTIZED_EXPERTS_MODES:
        raise QuantizationError(f"quantized_experts must be one of {list(QUANTIZED_EXPERTS_MODES)}, got {mode!r}")
    if mode == "dequantize" or (mode == "auto" and backend not in QUANTIZED_KERNEL_BACKENDS):
        return {}
    from .checkpoint import quantized_groups

    per_layer: dict[int, set[str]] = {}
    refused: dict[int, str] = {}
    for name, (kind, shape, block, scale_shape) in quantized_groups(path).items():
        m = _EXPERT.match(canonical(name))
        if not m:
            continue
        layer = int(m.group(1))
        if kind == "fp8" and fp8_block_fits_kernel(shape[-2], shape[-1], block, scale_shape):
            per_layer.setdefault(layer, set()).add("fp8")
        elif kind == "fp4":
            per_layer.setdefault(layer, set()).add("mxfp4")
        else:
            why = f"{kind} with scale block {block}" if kind == "fp8" else kind
            refused.setdefault(layer, f"tensor {name!r} is {why}; the expert kernels read FP8 on 128x128 blocks or FP4")
    keep: dict[int, str] = {}
    for layer, kinds in per_layer.items():
        if layer in refused or len(kinds) != 1:
            refused.setdefault(layer, f"layer {layer} mixes expert formats {sorted(kinds)}")
            continue
        keep[layer] = kinds.pop()
    if refused and mode == "keep":
        layer = min(refused)
        raise QuantizationError(f"{path}: cannot keep the routed experts quantized: {refused[layer]}")
    for layer in sorted(refused):
        logger.warning("%s: dequantizing the routed experts of layer %d (%s)", path, layer, refused[layer])
    return keep


def load_quantized_model(
    model_cls,
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    moe_backend: str | None = None,
    config=None,
    quantized_experts: str = "auto",
    device: str | torch.device | None = None,
):
    """Build ``model_cls`` from ``path``'s config and fill it from the checkpoint (any supported
    format), dequantizing to ``dtype``. Raises naming any checkpoint tensor the model lacks or any
    model tensor the checkpoint lacks.

    ``quantized_experts``: ``auto`` keeps FP8 / FP4 routed experts in their stored format when the
    MoE backend for ``device`` reads them directly (Triton: dequantized inside the kernel), ``keep``
    always keeps them (on CPU the experts hit are dequantized per call, so memory stays at the
    quantized size), ``dequantize`` turns every weight into ``dtype``. ``device``: where the model
    goes after loading (tensors are read on the CPU, one at a time)."""
    from dsv41.modeling.moe_deepseek_v4 import resolve_backend

    path = Path(path)
    if config is None:
        config = model_cls.config_class.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    backend = resolve_backend(moe_backend or getattr(config, "moe_backend", "auto"), target_device)
    keep_layers = _expert_layers_to_keep(path, quantized_experts, backend)
    model = model_cls._from_config(config, dtype=dtype)
    model.eval()
    if keep_layers:
        from .experts import DeepseekV4QuantizedExperts

        for layer, fmt in keep_layers.items():
            mlp = model.model.layers[layer].mlp
            mlp.experts = DeepseekV4QuantizedExperts(
                fmt, config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, config.swiglu_limit
            )
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    filled: set[str] = set()
    unexpected: list[str] = []
    expert_fill: dict[str, set] = {}

    def kept(name: str) -> bool:
        m = _EXPERT.match(canonical(name))
        return bool(m) and int(m.group(1)) in keep_layers

    with torch.no_grad():
        for name, tensor, raw in iter_checkpoint_tensors(path, dtype, keep=kept if keep_layers else None):
            if _IGNORE.search(name):
                continue
            if raw is not None:  # a routed-expert weight kept quantized
                m = _EXPERT.match(canonical(name))
                layer, e, w = int(m.group(1)), int(m.group(2)), m.group(3)
                experts = model.model.layers[layer].mlp.experts
                experts.set_expert(e, w, raw.weight, raw.scale, name)
                expert_fill.setdefault(f"model.layers.{layer}.mlp.experts.quantized", set()).add((e, w))
                continue
            if name in params:  # in-memory naming
                _copy(params[name], tensor, name)
                filled.add(name)
                continue
            m = _EXPERT.match(canonical(name))
            if m:
                layer, e, w = int(m.group(1)), int(m.group(2)), m.group(3)
                base = f"model.layers.{layer}.mlp.experts."
                if w == "w2":
                    target, rows = base + "down_proj", None
                else:
                    target = base + "gate_up_proj"
                    if target not in params:
                        unexpected.append(name)
                        continue
                    inter = params[target].shape[1] // 2
                    rows = slice(0, inter) if w == "w1" else slice(inter, 2 * inter)
                if target not in params or e >= params[target].shape[0]:
                    unexpected.append(name)
                    continue
                dst = params[target][e] if rows is None else params[target][e, rows]
                _copy(dst, tensor, name)
                expert_fill.setdefault(target, set()).add((e, w))
                continue
            mem = _official_to_memory(name)
            if mem is None or mem not in params:
                unexpected.append(name)
                continue
            _copy(params[mem], tensor, name)
            filled.add(mem)
    for target, got in expert_fill.items():
        layer = target.split(".")[2]
        if target.endswith(".quantized"):
            n = config.n_routed_experts
            need = {(e, w) for e in range(n) for w in ("w1", "w2", "w3")}
            prefix = target[: -len("quantized")]
            done = [prefix + b for b in ("gate_up_q", "gate_up_scale", "down_q", "down_scale")]
        else:
            n = params[target].shape[0]
            need = {(e, w) for e in range(n) for w in (("w2",) if target.endswith("down_proj") else ("w1", "w3"))}
            done = [target]
        if need - got:
            e, w = sorted(need - got)[0]
            raise QuantizationError(f"{path}: missing tensor layers.{layer}.ffn.experts.{e}.{w}.weight")
        filled.update(done)
    persistent = {n for n, _ in model.named_parameters()}
    persistent |= {n for n in dict(model.named_buffers()) if _is_persistent(model, n)}
    missing = sorted(persistent - filled)
    if unexpected or missing:
        raise QuantizationError(
            f"{path}: checkpoint does not match the model: "
            + "; ".join([f"unexpected tensor {n}" for n in unexpected[:10]] + [f"missing tensor {n}" for n in missing[:10]])
        )
    if device is not None:
        model.to(target_device)
    if hasattr(model, "set_moe_backend"):
        model.set_moe_backend(moe_backend or getattr(model.config, "moe_backend", "auto"))
    return model


def _is_persistent(model, name: str) -> bool:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return leaf not in getattr(mod, "_non_persistent_buffers_set", set())


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise QuantizationError(f"tensor {name!r}: the model expects shape {list(dst.shape)}, found {list(src.shape)}")
    dst.copy_(src)
