"""Analytic efficiency model: Llama 3 70B against a hand computation, DeepSeek-V4 against real models."""

from __future__ import annotations

import json

import pytest
import torch
from dsv41.evals.efficiency import (
    ConfigError,
    arch_from_config,
    compare_efficiency,
    cost_at,
    load_arch,
    summarize,
)
from dsv41.evals.testing import TINY_V4, randomize_hash_tables_


def close(a, b, rel=0.01):
    return abs(a - b) <= rel * abs(b)


# ---------------------------------------------------------------------------------------------
# Llama 3 70B: written out by hand from the published config (hidden 8192, 80 layers, 64 heads of
# 128, 8 KV heads, SwiGLU 28672, vocab 128256, untied embeddings).
# ---------------------------------------------------------------------------------------------
H, L, NH, NKV, HD, FF, V = 8192, 80, 64, 8, 128, 28672, 128256
ATTN = H * H + 2 * H * (NKV * HD) + H * H  # q, k, v, o  = 150,994,944
MLP = 3 * H * FF  # gate, up, down                   = 704,643,072
HAND_TOTAL = L * (ATTN + MLP + 2 * H) + 2 * V * H + H  # ~70.55e9
HAND_MATMUL = L * (ATTN + MLP) + V * H  # head is a matmul, embedding is a lookup; ~69.5e9


def hand_decode(ctx):  # 2 FLOP per weight + QK^T and AV over ctx keys for 64 heads in 80 layers
    return 2 * HAND_MATMUL + 2 * 2 * L * NH * HD * ctx


def hand_prefill(ctx):  # mean over positions 1..ctx of the causal attention span
    return 2 * HAND_MATMUL + 2 * 2 * L * NH * HD * (ctx + 1) / 2


def hand_kv_bytes(ctx):  # K and V, 8 heads of 128, 80 layers, bf16
    return 2 * NKV * HD * L * 2 * ctx


def test_llama3_70b_matches_hand_computation():
    arch = load_arch("llama-3-70b")
    assert close(arch.total_params(), HAND_TOTAL)
    assert close(arch.total_params(), 70.55e9, rel=0.002)  # Meta: "70B"; 70.55B counted
    assert close(arch.param_breakdown()["matmul_active"], HAND_MATMUL)
    for ctx in (4096, 32768, 131072):
        c = cost_at(arch, ctx)
        assert close(c.decode_flops, hand_decode(ctx)), ctx
        assert close(c.prefill_flops, hand_prefill(ctx)), ctx
        assert close(c.kv_bytes, hand_kv_bytes(ctx)), ctx
        assert c.kv_bytes_per_token == pytest.approx(327680)  # 320 KiB / token
    # the reference note's derived values: 160.5 GFLOP decode at 8K, 482.6 at 128K
    assert close(cost_at(arch, 8192).decode_flops, 160.5e9)
    assert close(cost_at(arch, 131072).decode_flops, 482.6e9)
    # Llama 3 (not 3.1) is an 8K-context model: longer contexts are flagged
    assert cost_at(arch, 32768).beyond_max_context and not cost_at(load_arch("llama-3.1-70b"), 131072).beyond_max_context


def test_deepseek_v4_builtins_match_published_and_derived_numbers():
    flash = load_arch("deepseek-v4-flash")
    counts = summarize(flash)["arch"]["layer_counts"]
    assert counts == {"sliding_attention": 2, "compressed_sparse_attention": 21, "heavily_compressed_attention": 20}
    assert close(flash.total_params(), 284e9, rel=0.01)  # published 284B
    assert close(flash.active_params(), 13e9, rel=0.03)  # published 13B activated
    # KV growth: 21 CSA layers x (512 + 128) / 4 + 20 HCA layers x 512 / 128 = 3440 values = 6880 B bf16
    assert flash.kv_values_per_token_asymptotic() == 3440
    # attention at 128K decode: core 4.8 GFLOP + indexer 11.3 GFLOP
    c = cost_at(flash, 131072)
    assert close(c.decode_breakdown["attention_core"], 4.82e9) and close(c.decode_breakdown["indexer"], 11.3e9)
    pro = load_arch("deepseek-v4-pro")
    assert close(pro.active_params(), 49e9, rel=0.03) and close(pro.total_params(), 1.6e12, rel=0.03)
    r = compare_efficiency("deepseek-v4-flash", "llama-3-70b")["ratios_baseline_over_model"]
    at128 = r["contexts"][-1]
    assert at128["context"] == 131072 and 10 < at128["decode_flops"] < 12.5 and 40 < at128["kv_bytes"] < 60


def test_total_params_equal_real_models(tiny_tokenizer_dir):
    import transformers
    from dsv41.modeling import DeepseekV4Config, DeepseekV4ForCausalLM

    kw = dict(TINY_V4, vocab_size=101)
    for cfg in (dict(kw), dict(kw, layer_types=["heavily_compressed_attention", "compressed_sparse_attention",
                                                "compressed_sparse_attention"], hc_mult=3, n_routed_experts=5)):
        ours = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg))
        theirs = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**cfg))
        expected = sum(p.numel() for p in ours.parameters())
        assert expected == sum(p.numel() for p in theirs.parameters())
        assert arch_from_config(ours.config.to_dict()).total_params() == expected


def _touched_active_params(model, input_ids) -> tuple[float, set[str]]:
    """Parameters actually read in a forward pass, per token: every parameter that reaches a torch op
    (TorchFunctionMode hook), with routed experts counted from the routing the experts modules
    receive (forward pre-hooks) and the embedding table excluded (a lookup reads one row)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    expert_param_ids = {id(p) for m in experts for p in m.parameters()}
    embed_id = id(model.get_input_embeddings().weight)
    params = {id(p): (n, p) for n, p in model.named_parameters() if id(p) not in expert_param_ids and id(p) != embed_id}
    touched: set[int] = set()
    routing: list[torch.Tensor] = []

    class Tracker(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            for leaf in tree_leaves((args, kwargs or {})):
                if isinstance(leaf, torch.Tensor) and id(leaf) in params:
                    touched.add(id(leaf))
            return func(*args, **(kwargs or {}))

    handles = [m.register_forward_pre_hook(lambda mod, args: routing.append(args[1].detach().clone())) for m in experts]
    try:
        with torch.no_grad(), Tracker():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert len(routing) == len(experts)
    per_expert = [sum(p[0].numel() for p in (m.gate_up_proj, m.down_proj)) for m in experts]
    expert_part = sum(float(torch.tensor([len(set(row.tolist())) for row in idx]).float().mean()) * size
                      for idx, size in zip(routing, per_expert))
    return sum(params[i][1].numel() for i in touched) + expert_part, {params[i][0] for i in touched}


@pytest.mark.parametrize("impl", ["transformers", "dsv41"])
def test_active_params_match_parameters_touched_in_forward(impl):
    torch.manual_seed(0)
    cfg = dict(TINY_V4, vocab_size=97)
    if impl == "transformers":
        import transformers

        model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**cfg)).eval()
    else:
        from dsv41.modeling import DeepseekV4Config, DeepseekV4ForCausalLM

        model = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
        randomize_hash_tables_(model)
    # 16 tokens: every CSA (ratio 4) and HCA (ratio 8) compressor emits entries, so their pooling
    # parameters are read; experts are counted per token from the routing actually used.
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(1))
    measured, names = _touched_active_params(model, ids)
    analytic = arch_from_config(model.config.to_dict()).active_params()
    assert measured == pytest.approx(analytic, rel=1e-9), sorted(names)
    # sanity: the hook saw the indexer and the hyper-connections (so the comparison is not vacuous)
    assert any("indexer" in n for n in names) and any("hc" in n for n in names)


def test_config_json_and_errors(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = load_arch(str(tmp_path))
    # 2 x (q 64*64 + kv 2*64*32 + o 64*64 + mlp 3*64*128 + norms 128) + embedding + final norm (tied head)
    assert arch.total_params() == 2 * (4096 + 4096 + 4096 + 24576 + 128) + 64000 + 64
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_arch(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        arch_from_config({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 3})


def test_efficiency_cli_prints_ratios():
    from typer.testing import CliRunner

    from dsv41.cli import app

    res = CliRunner().invoke(app, ["efficiency", "--model", "deepseek-v4-flash", "--baseline", "llama-3-70b", "--no-measure"])
    assert res.exit_code == 0, res.output
    assert "decode GFLOP/token @128K" in res.output and "KV cache @32K" in res.output and "*published*" in res.output
