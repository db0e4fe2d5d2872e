"""A tiny random causal LM for smoke tests of the audit (any HF causal LM works the same way)."""

from __future__ import annotations

from pathlib import Path


def make_tiny_causal_lm(tokenizer_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a 2-layer random Llama model with the tokenizer from ``tokenizer_dir`` to ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = Path(out_dir)
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out
