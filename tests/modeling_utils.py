"""Tiny DeepSeek-V4 configs and fully random weights for parity tests."""

from __future__ import annotations

import torch

LAYERS_MIXED = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention", "compressed_sparse_attention"]


def tiny_config_kwargs(**overrides) -> dict:
    """Small enough to run in milliseconds, large enough that every compressed branch emits entries
    for ~20 tokens (CSA ratio 2, HCA ratio 4) and the indexer must choose (index_topk 3 < entries)."""
    kwargs = dict(
        vocab_size=97, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
        head_dim=16, q_lora_rank=24, num_experts_per_tok=2, n_routed_experts=6, o_groups=2, o_lora_rank=8,
        # 16 indexer heads: an entry scores exactly 0 (ReLU on every head) with probability 2^-16, so
        # ties at the top-k boundary, where implementations may legitimately differ, do not occur.
        index_n_heads=16, index_head_dim=16, index_topk=3, sliding_window=6, hc_mult=3, hc_sinkhorn_iters=5,
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        layer_types=list(LAYERS_MIXED), mlp_layer_types=["hash_moe", "moe", "moe", "hash_moe"],
        qk_rope_head_dim=8, max_position_embeddings=256, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    kwargs.update(overrides)
    return kwargs


PARITY_CONFIGS = {
    "mixed_sqrtsoftplus": tiny_config_kwargs(),
    "sigmoid_yarn": tiny_config_kwargs(
        scoring_func="sigmoid",
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention", "heavily_compressed_attention"],
        mlp_layer_types=["moe", "hash_moe", "moe", "moe"],
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1},
        num_experts_per_tok=3, n_routed_experts=7,
    ),
    "all_csa_topk1": tiny_config_kwargs(
        layer_types=["compressed_sparse_attention"] * 3, mlp_layer_types=["hash_moe", "moe", "moe"], num_hidden_layers=3,
        index_topk=2, num_experts_per_tok=1,
    ),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter and buffer random values (transformers zero-initialises sinks, biases,
    hyper-connection and position-bias tensors, which would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    n_experts = model.config.n_routed_experts
    for key, value in model.state_dict().items():
        if key.endswith("tid2eid"):
            state[key] = torch.stack([torch.randperm(n_experts, generator=gen)[: value.shape[1]] for _ in range(value.shape[0])])
        elif value.is_floating_point():
            if "norm" in key:
                state[key] = 1 + 0.1 * torch.randn(value.shape, generator=gen)
            else:
                state[key] = torch.randn(value.shape, generator=gen) * (0.5 if value.dim() > 1 else 0.3)
        else:
            state[key] = value
    model.load_state_dict(state, strict=True)
