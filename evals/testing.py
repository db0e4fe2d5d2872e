"""Tiny random models for smoke tests of the eval harness (the real comparison uses real checkpoints)."""

from __future__ import annotations

from pathlib import Path

TINY_V4 = {
    "hidden_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "head_dim": 32,
    "q_lora_rank": 32, "num_experts_per_tok": 2, "n_routed_experts": 4, "o_groups": 2, "o_lora_rank": 16,
    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4, "sliding_window": 16, "hc_mult": 2, "hc_sinkhorn_iters": 3,
    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    "mlp_layer_types": ["hash_moe", "moe", "moe"], "qk_rope_head_dim": 8, "max_position_embeddings": 2048,
}


def randomize_hash_tables_(model, seed: int = 0) -> None:
    """Give every hash-routed layer distinct experts per token (the default table routes all to expert 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith("tid2eid"):
            n_experts = model.config.n_routed_experts
            buf.copy_(torch.stack([torch.randperm(n_experts, generator=gen)[: buf.shape[1]] for _ in range(buf.shape[0])]))


def make_tiny_v4(tokenizer_dir: str | Path, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random DeepSeek-V4 (our modeling) with the tokenizer from ``tokenizer_dir``."""
    import torch
    from dsv41.modeling import DeepseekV4Config, DeepseekV4ForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = DeepseekV4Config(**{**TINY_V4, **overrides}, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():
        randomize_hash_tables_(model, seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
