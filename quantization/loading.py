"""Loading any supported checkpoint format into our model on CPU (dequantize on the fly).

:func:`load_quantized_model` is what ``DeepseekV4ForCausalLM.from_pretrained`` can call when the
folder's config.json carries a ``quantization_config`` (or any quantized tensor is present): the
model is built from the config (without the quantization config), then every checkpoint tensor
is read, dequantized and copied into its parameter one at a time, so the peak memory is the model
plus one tensor. Official, mixed (``model.`` prefix) and in-memory namings are all accepted.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import iter_dequantized_tensors
from .codecs import QuantizationError
from .names import canonical

_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")
_IGNORE = re.compile(r"(^|\.)mtp\.")


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


def load_quantized_model(
    model_cls,
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    moe_backend: str | None = None,
    config=None,
):
    """Build ``model_cls`` from ``path``'s config and fill it from the checkpoint (any supported
    format), dequantizing to ``dtype``. Raises naming any checkpoint tensor the model lacks or any
    model tensor the checkpoint lacks."""
    path = Path(path)
    if config is None:
        config = model_cls.config_class.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = model_cls._from_config(config, dtype=dtype)
    model.eval()
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    filled: set[str] = set()
    unexpected: list[str] = []
    expert_fill: dict[str, set] = {}
    with torch.no_grad():
        for name, tensor in iter_dequantized_tensors(path, dtype):
            if _IGNORE.search(name):
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
        n = params[target].shape[0]
        need = {(e, w) for e in range(n) for w in (("w2",) if target.endswith("down_proj") else ("w1", "w3"))}
        if need - got:
            e, w = sorted(need - got)[0]
            layer = target.split(".")[2]
            raise QuantizationError(f"{path}: missing tensor layers.{layer}.ffn.experts.{e}.{w}.weight")
        filled.add(target)
    persistent = {n for n, _ in model.named_parameters()}
    persistent |= {n for n in dict(model.named_buffers()) if _is_persistent(model, n)}
    missing = sorted(persistent - filled)
    if unexpected or missing:
        raise QuantizationError(
            f"{path}: checkpoint does not match the model: "
            + "; ".join([f"unexpected tensor {n}" for n in unexpected[:10]] + [f"missing tensor {n}" for n in missing[:10]])
        )
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
