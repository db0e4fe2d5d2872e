"""Built-in model configurations for the efficiency comparison, each with where it comes from.

The dictionaries use the field names of the models' own ``config.json`` files, so that they go
through exactly the same parsing as a user's config (:func:`dsv41.evals.efficiency.arch_from_config`).
"""

from __future__ import annotations

import json
from pathlib import Path

# DeepSeek-V4-Flash: 2 sliding-window layers, then CSA (ratio 4) and HCA (ratio 128) alternating,
# 43 backbone layers (the official file lists one more ratio for the MTP layer, which is dropped).
_FLASH_RATIOS = [0, 0] + [4 if i % 2 == 0 else 128 for i in range(41)] + [0]
# DeepSeek-V4-Pro: 2 HCA layers, then CSA / HCA alternating over 61 layers (31 HCA, 30 CSA).
_PRO_RATIOS = [128, 128] + [4 if i % 2 == 0 else 128 for i in range(59)] + [0]

_V4_COMMON = {
    "model_type": "deepseek_v4", "vocab_size": 129280, "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64,
    "n_shared_experts": 1, "num_experts_per_tok": 6, "sliding_window": 128, "compress_rate_csa": 4, "compress_rate_hca": 128,
    "index_n_heads": 64, "index_head_dim": 128, "hc_mult": 4, "hc_sinkhorn_iters": 20, "num_hash_layers": 3,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 1048576, "tie_word_embeddings": False,
}

BUILTIN_CONFIGS: dict[str, dict] = {
    "deepseek-v4-flash": dict(
        _V4_COMMON, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, q_lora_rank=1024,
        o_groups=8, o_lora_rank=1024, n_routed_experts=256, moe_intermediate_size=2048, index_topk=512,
        compress_ratios=_FLASH_RATIOS,
    ),
    "deepseek-v4-pro": dict(
        _V4_COMMON, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
        o_groups=16, o_lora_rank=1024, n_routed_experts=384, moe_intermediate_size=3072, index_topk=1024,
        compress_ratios=_PRO_RATIOS,
    ),
    "llama-3-70b": {
        "model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 28672, "vocab_size": 128256, "tie_word_embeddings": False,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False,
    },
    "llama-3.1-70b": {
        "model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 28672, "vocab_size": 128256, "tie_word_embeddings": False,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    },
}

BUILTIN_SOURCES: dict[str, str] = {
    "dsv41-tiny": "the bundled checkpoint's config.json (dsv41/checkpoints/dsv41-tiny), or the training recipe's "
                  "TINY_ARCH (dsv41.training.train) with a 4096-token vocabulary while the checkpoint is not written",
    "deepseek-v4-flash": "https://huggingface.co/deepseek-ai/DeepSeek-V4-Flash config.json (as transcribed in "
                         "shared/reference/anchors-and-facts.md 2.1; transformers 5.24 DeepseekV4Config defaults)",
    "deepseek-v4-pro": "https://huggingface.co/deepseek-ai/DeepSeek-V4-Pro/blob/main/config.json (as transcribed in "
                       "shared/reference/anchors-and-facts.md 2.1)",
    "llama-3-70b": "https://huggingface.co/meta-llama/Meta-Llama-3-70B config.json (anchors-and-facts.md 3.2)",
    "llama-3.1-70b": "https://huggingface.co/meta-llama/Llama-3.1-70B config.json (anchors-and-facts.md 3.2)",
}

# Published parameter counts, for a sanity column next to the analytic ones.
PUBLISHED_PARAMS: dict[str, dict] = {
    "deepseek-v4-flash": {"total": 284e9, "active": 13e9, "source": "DeepSeek-V4-Flash model card (284B total / 13B activated)"},
    "deepseek-v4-pro": {"total": 1.6e12, "active": 49e9, "source": "DeepSeek-V4-Pro model card (1.6T total / 49B activated)"},
    "llama-3-70b": {"total": 70e9, "active": 70e9, "source": "Meta Llama 3 model card (70B, dense)"},
    "llama-3.1-70b": {"total": 70e9, "active": 70e9, "source": "Meta Llama 3.1 model card (70B, dense)"},
}


def tiny_release_config() -> dict:
    """Our release config: the bundled checkpoint's config.json when it exists."""
    from dsv41 import default_model_path

    path = Path(default_model_path()) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from dsv41.training.train import TINY_ARCH

    return dict(TINY_ARCH, model_type="deepseek_v4", vocab_size=4096, n_shared_experts=1, num_key_value_heads=1,
                tie_word_embeddings=False)


def builtin_names() -> list[str]:
    return ["dsv41-tiny", *BUILTIN_CONFIGS]


def builtin_config(name: str) -> dict:
    key = name.lower()
    if key == "dsv41-tiny":
        return tiny_release_config()
    if key not in BUILTIN_CONFIGS:
        raise KeyError(f"unknown built-in config {name!r}; built-ins: {', '.join(builtin_names())}")
    return dict(BUILTIN_CONFIGS[key])
