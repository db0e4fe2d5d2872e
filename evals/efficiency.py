"""Analytic cost model: parameters, FLOPs per token (prefill and decode) and KV-cache bytes.

Two families are understood:

* ``dense`` — Llama-style decoder (GQA attention, gated MLP; optional sliding window and
  Mixtral-style routed experts);
* ``deepseek_v4`` — DeepSeek-V4 (transformers' ``deepseek_v4`` / ``dsv41.modeling``): mHC residual
  streams, shared K=V single-head attention with a sliding window on every layer, CSA layers
  (compressor with overlapping windows of ratio m, lightning indexer, top-k selected compressed
  entries), HCA layers (compressor with ratio m', all compressed entries attended), grouped
  low-rank output projection, DeepSeekMoE (router + k routed experts + shared experts).

Conventions (written down so that the numbers can be checked by hand):

* FLOPs are forward FLOPs, 2 per multiply-accumulate. Embedding lookups, norms, softmax,
  activations, RoPE and top-k selection are not counted (they are < 0.5 % here).
* ``decode`` at context c: the cost of the token at position c (it attends to c positions,
  itself included). ``prefill`` at context c: the mean cost per token over positions 1..c of a
  c-token prompt, counting only the causally needed work (what an efficient kernel does).
* Attention core: QK^T and AV, 2 * 2 * heads * head_dim FLOPs per attended entry (Llama:
  query heads x head_dim; V4: 64 heads x 512 over the shared K=V entry).
* V4 entries per query at position p: window min(p, sliding_window); CSA adds
  min(index_topk, floor(p / m)) selected entries and the indexer scores all floor(p / m)
  compressed keys (2 * index_n_heads * index_head_dim FLOPs each, plus the head weighting);
  HCA adds floor(p / m'). Compressor pooling (a softmax-weighted sum of 2m / m' slots per emitted
  entry) and the mHC stream mixing are counted too.
* Active parameters: every parameter the computation for one token reads, *excluding* the
  embedding table (a lookup reads one row; reported separately as ``embedding_params``) and the
  experts the token is not routed to. MTP / draft layers are excluded everywhere.
* KV cache for one sequence of c tokens at ``kv_bytes`` per value (2 = bf16): Llama keeps K and
  V for every layer; V4 keeps one K=V window of min(c, sliding_window) entries per layer, plus
  floor(c / m) compressed entries of (head_dim + index_head_dim) values per CSA layer and
  floor(c / m') entries of head_dim values per HCA layer. Compressor staging buffers (< m tokens)
  are ignored.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CONTEXTS = (4096, 32768, 131072)
SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


class ConfigError(ValueError):
    """A config that cannot be analysed; the message names the field."""


def _need(cfg: dict, key: str, source: str):
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{source}: config field {key!r} is required for the efficiency model")
    return cfg[key]


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


@dataclass
class Arch(ABC):
    name: str
    family: str
    source: str
    max_position_embeddings: int | None = None

    @abstractmethod
    def param_breakdown(self) -> dict[str, int]:
        """Parameter counts by component, with ``total`` and ``active`` (per token)."""

    def total_params(self) -> int:
        b = self.param_breakdown()
        return b["total"]

    def active_params(self) -> int:
        return self.param_breakdown()["active"]


@dataclass
class DenseArch(Arch):
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    n_experts: int = 0  # 0 = dense MLP
    experts_per_tok: int = 0

    def _mlp(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def param_breakdown(self) -> dict[str, int]:
        H, hd = self.hidden_size, self.head_dim
        q = H * self.num_heads * hd
        kv = 2 * H * self.num_kv_heads * hd
        o = self.num_heads * hd * H
        bias = (self.num_heads + 2 * self.num_kv_heads) * hd if self.attention_bias else 0
        attn = q + kv + o + bias
        norms = 2 * H
        if self.n_experts:
            router = self.n_experts * H
            mlp_total = router + self.n_experts * self._mlp()
            mlp_active = router + self.experts_per_tok * self._mlp()
        else:
            mlp_total = mlp_active = self._mlp()
        embed = self.vocab_size * H
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        layers_total = self.num_layers * (attn + mlp_total + norms)
        layers_active = self.num_layers * (attn + mlp_active + norms)
        total = embed + head + layers_total + H
        # A tied head is still read (as a matmul) for every token.
        active = layers_active + H + self.vocab_size * H
        matmul_active = self.num_layers * (q + kv + o + mlp_active) + self.vocab_size * H
        return {
            "total": total, "active": active, "embedding": embed, "matmul_active": matmul_active,
            "attention_per_layer": attn, "mlp_per_layer_total": mlp_total, "lm_head": self.vocab_size * H,
        }

    # attention core FLOPs for a query at position p (vectorised over p)
    def _attn_flops(self, p: np.ndarray) -> dict[str, np.ndarray]:
        keys = np.minimum(p, self.sliding_window) if self.sliding_window else p
        return {"attention_core": 4.0 * self.num_layers * self.num_heads * self.head_dim * keys}

    def kv_values(self, c: int) -> float:
        kept = min(c, self.sliding_window) if self.sliding_window else c
        return 2.0 * self.num_kv_heads * self.head_dim * self.num_layers * kept

    def kv_values_per_token_asymptotic(self) -> float:
        return 0.0 if self.sliding_window else 2.0 * self.num_kv_heads * self.head_dim * self.num_layers


@dataclass
class DeepseekV4Arch(Arch):
    hidden_size: int = 0
    num_heads: int = 0
    head_dim: int = 0
    q_lora_rank: int = 0
    o_groups: int = 0
    o_lora_rank: int = 0
    n_routed_experts: int = 0
    experts_per_tok: int = 0
    n_shared_experts: int = 1
    moe_intermediate_size: int = 0
    vocab_size: int = 0
    sliding_window: int = 0
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    hc_mult: int = 1
    rate_csa: int = 4
    rate_hca: int = 128
    layer_types: list = field(default_factory=list)
    tie_word_embeddings: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def count(self, kind: str) -> int:
        return sum(1 for t in self.layer_types if t == kind)

    def _components(self) -> dict[str, dict[str, int]]:
        """Per-layer-kind parameter counts: ``matmul`` (read as matrices by every token) and
        ``other`` (vectors: norms, sinks, biases, position biases, mHC scalars)."""
        H, hd, qr = self.hidden_size, self.head_dim, self.q_lora_rank
        nh, n = self.num_heads, self.hc_mult
        ihd, inh = self.index_head_dim, self.index_n_heads
        attn_mm = H * qr + qr * nh * hd + H * hd + nh * hd * self.o_lora_rank + self.o_groups * self.o_lora_rank * H
        attn_other = qr + hd + nh  # q_a_norm, kv_norm, sinks
        hc_mm = 2 * ((2 + n) * n * n * H)  # attn_hc.fn + ffn_hc.fn
        hc_other = 2 * ((2 + n) * n + 3)  # base + scale, twice
        norms = 2 * H  # input_layernorm + post_attention_layernorm
        expert = 3 * H * self.moe_intermediate_size
        router = self.n_routed_experts * H
        shared = self.n_shared_experts * expert
        csa_mm = 2 * (H * 2 * hd) + 2 * (H * 2 * ihd) + qr * inh * ihd + H * inh
        csa_other = self.rate_csa * 2 * hd + hd + self.rate_csa * 2 * ihd + ihd  # position biases + kv norms
        hca_mm = 2 * (H * hd)
        hca_other = self.rate_hca * hd + hd
        return {
            "attention": {"matmul": attn_mm, "other": attn_other},
            "mhc": {"matmul": hc_mm, "other": hc_other},
            "norms": {"matmul": 0, "other": norms},
            "moe_active": {"matmul": router + self.experts_per_tok * expert + shared, "other": 0},
            "moe_total": {"matmul": router + self.n_routed_experts * expert + shared, "other": 0},
            "csa_compressor": {"matmul": csa_mm, "other": csa_other},
            "hca_compressor": {"matmul": hca_mm, "other": hca_other},
        }

    def param_breakdown(self) -> dict[str, int]:
        c = self._components()
        L = self.num_layers
        H, V, n = self.hidden_size, self.vocab_size, self.hc_mult
        per_layer_common_mm = c["attention"]["matmul"] + c["mhc"]["matmul"]
        per_layer_common_other = c["attention"]["other"] + c["mhc"]["other"] + c["norms"]["other"]
        comp_mm = self.count(CSA) * c["csa_compressor"]["matmul"] + self.count(HCA) * c["hca_compressor"]["matmul"]
        comp_other = self.count(CSA) * c["csa_compressor"]["other"] + self.count(HCA) * c["hca_compressor"]["other"]
        head_mm = V * H + n * n * H  # lm_head + hc_head.hc_fn
        head_other = H + n + 1  # final norm, hc_base, hc_scale
        embed = V * H
        active_mm = L * (per_layer_common_mm + c["moe_active"]["matmul"]) + comp_mm + head_mm
        active = active_mm + L * per_layer_common_other + comp_other + head_other
        total = (
            embed + (0 if self.tie_word_embeddings else V * H) + n * n * H + head_other
            + L * (per_layer_common_mm + per_layer_common_other + c["moe_total"]["matmul"]) + comp_mm + comp_other
        )
        return {
            "total": total, "active": active, "embedding": embed, "matmul_active": active_mm,
            "attention_per_layer": c["attention"]["matmul"] + c["attention"]["other"],
            "routed_experts_total": L * self.n_routed_experts * 3 * H * self.moe_intermediate_size,
            "compressors": comp_mm + comp_other, "lm_head": V * H,
        }

    def _attn_flops(self, p: np.ndarray) -> dict[str, np.ndarray]:
        per_entry = 4.0 * self.num_heads * self.head_dim
        window = np.minimum(p, self.sliding_window).astype(np.float64)
        n_csa, n_hca, L = self.count(CSA), self.count(HCA), self.num_layers
        csa_entries = np.floor_divide(p, self.rate_csa).astype(np.float64)
        hca_entries = np.floor_divide(p, self.rate_hca).astype(np.float64)
        selected = np.minimum(csa_entries, self.index_topk)
        core = per_entry * (L * window + n_csa * selected + n_hca * hca_entries)
        # Indexer: q.k over index heads for every visible compressed key, then weights * relu summed over heads.
        indexer = n_csa * csa_entries * (2.0 * self.index_n_heads * self.index_head_dim + 2.0 * self.index_n_heads)
        # Compressor pooling, amortised per token: CSA main (2m slots x head_dim per m tokens) + indexer, HCA m' slots.
        pooling = np.full_like(window, n_csa * (2.0 * 2 * self.head_dim + 2.0 * 2 * self.index_head_dim)
                               + n_hca * 2.0 * self.head_dim)
        # mHC: per hyper-connection collapse (n*H), expand (n*H) and comb mixing (n*n*H) MACs; 2 per layer, + head collapse.
        n, H = self.hc_mult, self.hidden_size
        mhc = np.full_like(window, 2.0 * (L * 2 * (2 * n * H + n * n * H) + n * H))
        return {"attention_core": core, "indexer": indexer, "compressor_pooling": pooling, "mhc_mixing": mhc}

    def kv_values(self, c: int) -> float:
        window = self.num_layers * min(c, self.sliding_window) * self.head_dim
        csa = self.count(CSA) * (c // self.rate_csa) * (self.head_dim + self.index_head_dim)
        hca = self.count(HCA) * (c // self.rate_hca) * self.head_dim
        return float(window + csa + hca)

    def kv_values_per_token_asymptotic(self) -> float:
        return (self.count(CSA) * (self.head_dim + self.index_head_dim) / self.rate_csa
                + self.count(HCA) * self.head_dim / self.rate_hca)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _v4_layer_types(cfg: dict, source: str) -> tuple[list[str], int, int]:
    n = int(_need(cfg, "num_hidden_layers", source))
    rates = {CSA: 4, HCA: 128}
    rates.update(cfg.get("compress_rates") or {})
    if cfg.get("compress_rate_csa") is not None:
        rates[CSA] = int(cfg["compress_rate_csa"])
    if cfg.get("compress_rate_hca") is not None:
        rates[HCA] = int(cfg["compress_rate_hca"])
    types = cfg.get("layer_types")
    if types is None and cfg.get("compress_ratios") is not None:
        to_type = {0: SWA, rates[CSA]: CSA, rates[HCA]: HCA}
        ratios = list(cfg["compress_ratios"])[:n]
        unknown = sorted({r for r in ratios if r not in to_type})
        if unknown:
            raise ConfigError(f"{source}: compress_ratios has ratios {unknown} that are neither 0, "
                              f"compress_rate_csa ({rates[CSA]}) nor compress_rate_hca ({rates[HCA]})")
        types = [to_type[r] for r in ratios]
    if types is None:  # dsv41.modeling's default layout
        rest = [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        types = [HCA] * min(n, 2) + rest
    types = list(types)[:n]
    if len(types) != n:
        raise ConfigError(f"{source}: layer_types has {len(types)} entries for num_hidden_layers={n}")
    bad = sorted({t for t in types if t not in (SWA, CSA, HCA)})
    if bad:
        raise ConfigError(f"{source}: layer_types contains unknown kinds {bad}")
    return types, int(rates[CSA]), int(rates[HCA])


def arch_from_config(cfg: dict, name: str = "model", source: str = "config") -> Arch:
    """Build the cost model from a ``config.json`` dictionary (any supported model type)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = dict(cfg["text_config"], model_type=cfg["text_config"].get("model_type", cfg.get("model_type")))
    model_type = str(cfg.get("model_type", "")).lower()
    label = f"{name} ({source})"
    if model_type in ("deepseek_v4", "deepseek_v4_text") or "compress_ratios" in cfg or "layer_types" in cfg and any(
        t in (CSA, HCA) for t in cfg.get("layer_types") or []
    ):
        types, m, m2 = _v4_layer_types(cfg, label)
        H = int(_need(cfg, "hidden_size", label))
        return DeepseekV4Arch(
            name=name, family="deepseek_v4", source=source, max_position_embeddings=cfg.get("max_position_embeddings"),
            hidden_size=H, num_heads=int(_need(cfg, "num_attention_heads", label)),
            head_dim=int(_need(cfg, "head_dim", label)), q_lora_rank=int(_need(cfg, "q_lora_rank", label)),
            o_groups=int(_need(cfg, "o_groups", label)), o_lora_rank=int(_need(cfg, "o_lora_rank", label)),
            n_routed_experts=int(_need(cfg, "n_routed_experts", label)),
            experts_per_tok=int(_need(cfg, "num_experts_per_tok", label)),
            n_shared_experts=int(cfg.get("n_shared_experts") or 1),
            moe_intermediate_size=int(_need(cfg, "moe_intermediate_size", label)),
            vocab_size=int(_need(cfg, "vocab_size", label)), sliding_window=int(_need(cfg, "sliding_window", label)),
            index_n_heads=int(_need(cfg, "index_n_heads", label)), index_head_dim=int(_need(cfg, "index_head_dim", label)),
            index_topk=int(_need(cfg, "index_topk", label)), hc_mult=int(cfg.get("hc_mult") or 1),
            rate_csa=m, rate_hca=m2, layer_types=types, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    if model_type.startswith("deepseek"):
        raise ConfigError(f"{label}: model_type {model_type!r} is not modelled (supported: deepseek_v4 and dense "
                          "Llama-style decoders such as llama, mistral, qwen2, qwen3, mixtral)")
    H = int(_need(cfg, "hidden_size", label))
    heads = int(_need(cfg, "num_attention_heads", label))
    head_dim = int(cfg.get("head_dim") or H // heads)
    n_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    return DenseArch(
        name=name, family="dense" if not n_experts else "moe", source=source,
        max_position_embeddings=cfg.get("max_position_embeddings"), hidden_size=H,
        num_layers=int(_need(cfg, "num_hidden_layers", label)), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
        intermediate_size=int(cfg.get("moe_intermediate_size") if n_experts and cfg.get("moe_intermediate_size")
                              else _need(cfg, "intermediate_size", label)),
        vocab_size=int(_need(cfg, "vocab_size", label)), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        n_experts=n_experts, experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
    )


def load_arch(spec: str) -> Arch:
    """``spec`` is a built-in name (see :func:`dsv41.evals.configs.builtin_names`), a path to a
    ``config.json`` or to a checkpoint directory holding one."""
    from .configs import BUILTIN_SOURCES, builtin_config, builtin_names

    if spec.lower() in builtin_names():
        return arch_from_config(builtin_config(spec), name=spec.lower(), source=BUILTIN_SOURCES[spec.lower()])
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{spec!r} is neither a built-in config ({', '.join(builtin_names())}) nor a config.json "
                          f"(looked at {path.resolve()})")
    cfg = json.loads(path.read_text())
    name = path.parent.name if path.name == "config.json" else path.stem
    return arch_from_config(cfg, name=name, source=str(path.resolve()))


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------


@dataclass
class CostPoint:
    context: int
    decode_flops: float
    prefill_flops: float
    decode_breakdown: dict
    prefill_breakdown: dict
    kv_bytes: float  # whole cache for one sequence of `context` tokens
    kv_bytes_per_token: float  # kv_bytes / context
    beyond_max_context: bool


def cost_at(arch: Arch, context: int, kv_bytes: float = 2.0) -> CostPoint:
    linear = 2.0 * arch.param_breakdown()["matmul_active"]
    p_dec = np.array([context], dtype=np.int64)
    p_pre = np.arange(1, context + 1, dtype=np.int64)
    dec = {k: float(v[0]) for k, v in arch._attn_flops(p_dec).items()}
    pre = {k: float(v.mean()) for k, v in arch._attn_flops(p_pre).items()}
    dec["linear"] = pre["linear"] = linear
    kv = arch.kv_values(context) * kv_bytes
    max_ctx = arch.max_position_embeddings
    return CostPoint(
        context=context, decode_flops=sum(dec.values()), prefill_flops=sum(pre.values()),
        decode_breakdown=dec, prefill_breakdown=pre, kv_bytes=kv, kv_bytes_per_token=kv / context,
        beyond_max_context=bool(max_ctx and context > int(max_ctx)),
    )


def summarize(arch: Arch, contexts=CONTEXTS, kv_bytes: float = 2.0) -> dict:
    b = arch.param_breakdown()
    from .configs import PUBLISHED_PARAMS

    return {
        "name": arch.name, "family": arch.family, "source": arch.source,
        "max_position_embeddings": arch.max_position_embeddings,
        "total_params": b["total"], "active_params": b["active"], "embedding_params": b["embedding"],
        "matmul_active_params": b["matmul_active"], "breakdown": b,
        "kv_bytes_per_value": kv_bytes,
        "kv_bytes_per_token_asymptotic": arch.kv_values_per_token_asymptotic() * kv_bytes,
        "published_params": PUBLISHED_PARAMS.get(arch.name),
        "contexts": [asdict(cost_at(arch, c, kv_bytes)) for c in contexts],
        "arch": {k: v for k, v in asdict(arch).items() if k != "layer_types"}
        | ({"layer_counts": {t: arch.count(t) for t in (SWA, CSA, HCA)}} if isinstance(arch, DeepseekV4Arch) else {}),
    }


def compare_efficiency(model: str, baseline: str, contexts=CONTEXTS, kv_bytes: float = 2.0) -> dict:
    a, b = load_arch(model), load_arch(baseline)
    sa, sb = summarize(a, contexts, kv_bytes), summarize(b, contexts, kv_bytes)
    ratios = {
        "total_params": sb["total_params"] / sa["total_params"],
        "active_params": sb["active_params"] / sa["active_params"],
        "contexts": [
            {
                "context": ca["context"],
                "decode_flops": cb["decode_flops"] / ca["decode_flops"],
                "prefill_flops": cb["prefill_flops"] / ca["prefill_flops"],
                "kv_bytes": cb["kv_bytes"] / ca["kv_bytes"],
            }
            for ca, cb in zip(sa["contexts"], sb["contexts"])
        ],
    }
    return {"model": sa, "baseline": sb, "ratios_baseline_over_model": ratios, "conventions": __doc__}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _fmt_count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _fmt_bytes(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def efficiency_markdown(result: dict, measured: dict | None = None) -> str:
    a, b, r = result["model"], result["baseline"], result["ratios_baseline_over_model"]
    lines = [
        f"## Efficiency (analytic): {a['name']} vs {b['name']}",
        "",
        f"- model: `{a['name']}` ({a['family']}) — {a['source']}",
        f"- baseline: `{b['name']}` ({b['family']}) — {b['source']}",
        f"- KV cache counted at {a['kv_bytes_per_value']:g} bytes per value; ratio = baseline / model.",
        "",
        f"| quantity | {a['name']} | {b['name']} | ratio |",
        "|---|---|---|---|",
        f"| total params | {_fmt_count(a['total_params'])} | {_fmt_count(b['total_params'])} | {r['total_params']:.2f}x |",
        f"| active params / token (excl. embedding) | {_fmt_count(a['active_params'])} | {_fmt_count(b['active_params'])} | {r['active_params']:.2f}x |",
        f"| KV growth / token (asymptotic) | {_fmt_bytes(a['kv_bytes_per_token_asymptotic'])} | {_fmt_bytes(b['kv_bytes_per_token_asymptotic'])} | "
        + (f"{b['kv_bytes_per_token_asymptotic'] / a['kv_bytes_per_token_asymptotic']:.1f}x |" if a['kv_bytes_per_token_asymptotic'] else "n/a |"),
    ]
    for ca, cb, rc in zip(a["contexts"], b["contexts"], r["contexts"]):
        c = ca["context"]
        tag = lambda s: " (beyond max context)" if s["beyond_max_context"] else ""
        lines += [
            f"| decode GFLOP/token @{c // 1024}K | {ca['decode_flops'] / 1e9:.3g}{tag(ca)} | {cb['decode_flops'] / 1e9:.3g}{tag(cb)} | {rc['decode_flops']:.2f}x |",
            f"| prefill GFLOP/token @{c // 1024}K | {ca['prefill_flops'] / 1e9:.3g}{tag(ca)} | {cb['prefill_flops'] / 1e9:.3g}{tag(cb)} | {rc['prefill_flops']:.2f}x |",
            (f"| KV cache @{c // 1024}K (per token) | {_fmt_bytes(ca['kv_bytes'])} ({_fmt_bytes(ca['kv_bytes_per_token'])}) | "
            f"{_fmt_bytes(cb['kv_bytes'])} ({_fmt_bytes(cb['kv_bytes_per_token'])}) | {rc['kv_bytes']:.1f}x |"),
        ]
    for s in (a, b):
        if s.get("published_params"):
            p = s["published_params"]
            lines.append(f"\n*published* parameter count of `{s['name']}`: {_fmt_count(p['total'])} total / "
                         f"{_fmt_count(p['active'])} active ({p['source']}); analytic above.")
    if measured:
        lines += ["", "### Measured on this machine (same run)", ""]
        if measured.get("skipped"):
            lines.append(f"Not measured: {measured['skipped']}")
        else:
            lines += ["| model | device | prompt tokens | prefill tok/s | decode tok/s | peak memory |", "|---|---|---|---|---|---|"]
            for key in ("model", "baseline"):
                m = measured.get(key) or {}
                if m.get("error"):
                    lines.append(f"| {key} | — | — | not measured: {m['error']} | | |")
                else:
                    lines.append(f"| {m['name']} | {m['device']} | {m['prompt_tokens']} | {m['prefill_tokens_per_s']:.1f} | "
                                 f"{m['decode_tokens_per_s']:.1f} | {_fmt_bytes(m['peak_memory_bytes'])} ({m['peak_memory_kind']}) |")
    return "\n".join(lines) + "\n"


