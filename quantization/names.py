"""Tensor naming: which checkpoint tensors are quantized, and the in-memory -> official name map.

Checkpoints use the official DeepSeek names (``embed.weight``, ``layers.N.attn.wq_a.weight``,
``layers.N.ffn.experts.E.w1.weight`` ...), optionally behind a ``model.`` prefix (stock
transformers keeps it when saving). In-memory module names are transformers' names
(``model.layers.N.self_attn.q_a_proj.weight``, ``model.layers.N.mlp.experts.gate_up_proj``).
"""

from __future__ import annotations

import re

#: official routed-expert weight: layers.N.ffn.experts.E.w{1,2,3}.weight
EXPERT_RE = re.compile(r"(^|\.)experts\.(\d+)\.(w[123])\.weight$")
#: transformers-style stacked experts [E, out, in]
STACKED_EXPERT_RE = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj|up_proj)$")

# Linear-like 2-D weights that stay in high precision in every DeepSeek release: embeddings, the
# output head, the MoE router (and its hash table), norms, and the mHC mixing parameters.
_NEVER = re.compile(
    r"(^|\.)(embed|embed_tokens|head|lm_head|wte|shared_head\.head)\.weight$"
    r"|(^|\.)(ffn|mlp)\.gate\.weight$"
    r"|norm[^.]*\.weight$"
    r"|(^|\.)hc_|(^|\.)(attn_hc|ffn_hc|hc_head)\."
)


def canonical(name: str) -> str:
    """Name without the optional leading ``model.`` (used to match across the two conventions)."""
    return name[6:] if name.startswith("model.") else name


def is_routed_expert(name: str) -> bool:
    return bool(EXPERT_RE.search(name) or STACKED_EXPERT_RE.search(name))


def is_quantizable_linear(name: str, shape) -> bool:
    """A dense linear weight (``*.weight``, 2-D) that weight quantization applies to."""
    if len(tuple(shape)) != 2 or not name.endswith(".weight") or _NEVER.search(name):
        return False
    return not is_routed_expert(name)


def module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


# In-memory (transformers) -> official, applied in order to the name without ``model.``.
_HF_TO_OFFICIAL = [
    (r"^embed_tokens\.weight$", "embed.weight"),
    (r"^lm_head\.weight$", "head.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.sinks$", ".attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.kv_norm\.", ".norm."),
    (r"\.position_bias$", ".ape"),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
]
_HF_TO_OFFICIAL_RE = [(re.compile(p), r) for p, r in _HF_TO_OFFICIAL]


def hf_to_official(name: str) -> str:
    """transformers' DeepseekV4ForCausalLM parameter name -> official checkpoint name (no ``model.``)."""
    out = canonical(name)
    for pat, rep in _HF_TO_OFFICIAL_RE:
        out = pat.sub(rep, out)
    return out
