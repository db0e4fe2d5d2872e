"""bitsandbytes NF4 / FP4 / int8 for our model, experts included.

``load_bnb_model(DeepseekV4ForCausalLM, path, BitsAndBytesConfig(...))`` loads through
transformers' bitsandbytes integration (every ``nn.Linear`` except the output head becomes
``Linear4bit`` / ``Linear8bitLt``) and then quantizes what that integration does not reach:
the routed experts (stacked ``gate_up_proj`` / ``down_proj`` parameters) and the block-diagonal
grouped output projection. Those are stored with bitsandbytes' own codecs (NF4/FP4 with absmax
per ``blocksize`` values and optional double quantization; int8 row-wise absmax) and dequantized
per expert / per call at compute time. bitsandbytes >= 0.47 runs these on CPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .codecs import QuantizationError


def _bnb():
    try:
        import bitsandbytes as bnb  # noqa: F401
        import bitsandbytes.functional as F
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QuantizationError(
            "bitsandbytes is not installed (pip install 'bitsandbytes>=0.47'; CPU builds are on PyPI)"
        ) from exc
    return F


class BnbWeight:
    """One matrix stored by bitsandbytes; ``dequantize()`` returns it in ``dtype``."""

    def __init__(self, w: torch.Tensor, config, dtype: torch.dtype):
        F = _bnb()
        self.shape = tuple(w.shape)
        self.dtype = dtype
        if getattr(config, "load_in_4bit", False):
            self.mode = "4bit"
            self.q, self.state = F.quantize_4bit(
                w.detach().to(dtype).contiguous(),
                blocksize=64,
                compress_statistics=bool(config.bnb_4bit_use_double_quant),
                quant_type=config.bnb_4bit_quant_type,
                quant_storage=torch.uint8,
            )
        elif getattr(config, "load_in_8bit", False):
            self.mode = "8bit"
            self.q, self.state, _ = F.int8_vectorwise_quant(w.detach().to(torch.float16).contiguous())
        else:
            raise QuantizationError("BitsAndBytesConfig: expected load_in_4bit=True or load_in_8bit=True")

    def dequantize(self) -> torch.Tensor:
        F = _bnb()
        if self.mode == "4bit":
            return F.dequantize_4bit(self.q, self.state).to(self.dtype).reshape(self.shape)
        return F.int8_vectorwise_dequant(self.q, self.state).to(self.dtype).reshape(self.shape)

    def nbytes(self) -> int:
        n = self.q.numel() * self.q.element_size()
        st = self.state
        if self.mode == "8bit":
            return n + st.numel() * st.element_size()
        n += st.absmax.numel() * st.absmax.element_size()
        if getattr(st, "state2", None) is not None:
            n += st.state2.absmax.numel() * st.state2.absmax.element_size() + st.offset.numel() * st.offset.element_size()
        return n


class BnbStack:
    """Stand-in for a stacked ``[E, out, in]`` expert parameter: ``stack[e]`` dequantizes expert ``e``."""

    def __init__(self, param: torch.Tensor, config, dtype: torch.dtype):
        self.items = [BnbWeight(param[e], config, dtype) for e in range(param.shape[0])]
        self.shape = torch.Size((param.shape[0], *param.shape[1:]))
        self.dtype = dtype
        self.device = param.device

    def __getitem__(self, e):
        return self.items[int(e)].dequantize()

    def __len__(self):
        return len(self.items)

    def dim(self):
        return len(self.shape)

    def nbytes(self) -> int:
        return sum(i.nbytes() for i in self.items)


class BnbGroupedWeight(nn.Module):
    """Replacement for a grouped projection's ``weight`` user: keeps bnb storage, same forward."""

    def __init__(self, module: nn.Module, config, dtype: torch.dtype):
        super().__init__()
        self.n_groups = module.n_groups
        self.stored = BnbWeight(module.weight.data, config, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.stored.dequantize().to(x.dtype).view(self.n_groups, -1, x.shape[-1])
        return torch.einsum("...gi,goi->...go", x, w)


def _skipped(name: str, config) -> bool:
    skip = list(getattr(config, "llm_int8_skip_modules", None) or [])
    return any(name == s or name.endswith("." + s) or f".{s}." in f".{name}." for s in skip)


def quantize_remaining_bnb(model: nn.Module, config, dtype: torch.dtype | None = None) -> dict:
    """Quantize the routed experts and grouped projections of ``model`` in place with ``config``
    (a ``BitsAndBytesConfig``). Returns counts of what was replaced."""
    dtype = dtype or getattr(config, "bnb_4bit_compute_dtype", None) or torch.bfloat16
    if not (getattr(config, "load_in_4bit", False) or getattr(config, "load_in_8bit", False)):
        raise QuantizationError("BitsAndBytesConfig: expected load_in_4bit=True or load_in_8bit=True")
    counts = {"experts": 0, "grouped": 0}
    for name, mod in list(model.named_modules()):
        if _skipped(name, config):
            continue
        gu = getattr(mod, "gate_up_proj", None)
        if isinstance(gu, nn.Parameter) and gu.dim() == 3:
            for attr in ("gate_up_proj", "down_proj"):
                stack = BnbStack(getattr(mod, attr).data, config, dtype)
                del mod._parameters[attr]
                setattr(mod, attr, stack)
            counts["experts"] += 1
        elif (
            not isinstance(mod, nn.Linear)
            and isinstance(getattr(mod, "n_groups", None), int)
            and isinstance(getattr(mod, "weight", None), nn.Parameter)
            and mod.weight.dim() == 2
        ):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, BnbGroupedWeight(mod, config, dtype))
            counts["grouped"] += 1
    return counts


def load_bnb_model(model_cls, path, config, dtype: torch.dtype = torch.bfloat16, **kwargs):
    """``model_cls.from_pretrained(path, quantization_config=config)`` plus the experts and grouped
    projections quantized with the same config."""
    _bnb()
    device_map = kwargs.get("device_map")
    on_cpu = not torch.cuda.is_available() or device_map in (None, "cpu", {"": "cpu"})
    if on_cpu and getattr(config, "load_in_4bit", False):
        # bitsandbytes' CPU 4-bit kernel packs rows in blocks: linears whose out_features is not a
        # multiple of 64 (e.g. the indexer's per-head weights) cannot be converted there; keep them.
        import copy

        config = copy.deepcopy(config)
        with torch.device("meta"):
            skeleton = model_cls(model_cls.config_class.from_pretrained(path))
        odd = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and (m.out_features % 64 or m.in_features % 2)]
        config.llm_int8_skip_modules = sorted(set(list(config.llm_int8_skip_modules or []) + odd + ["lm_head"]))
    model = model_cls.from_pretrained(path, quantization_config=config, dtype=dtype, **kwargs)
    model.bnb_extra_counts = quantize_remaining_bnb(model, config, dtype)
    return model


def bnb_model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's weights, counting bitsandbytes storage (quantized data and
    quantization constants) rather than a dequantized size."""
    total = 0
    seen = set()
    for mod in model.modules():
        for attr in ("gate_up_proj", "down_proj"):
            v = mod.__dict__.get(attr)
            if isinstance(v, BnbStack):
                total += v.nbytes()
        if isinstance(mod, BnbGroupedWeight):
            total += mod.stored.nbytes()
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                total += qs.absmax.numel() * qs.absmax.element_size()
                if getattr(qs, "state2", None) is not None:
                    total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
            scb = getattr(p, "SCB", None)
            if isinstance(scb, torch.Tensor):
                total += scb.numel() * scb.element_size()
        for b in mod.buffers(recurse=False):
            if id(b) not in seen:
                seen.add(id(b))
                total += b.numel() * b.element_size()
    return total
