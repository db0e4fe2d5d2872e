"""Our DeepSeek-V4 against transformers' DeepseekV4ForCausalLM with identical random weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from modeling_utils import PARITY_CONFIGS, randomize_

from dsv41.modeling import DeepseekV4Config, DeepseekV4ForCausalLM

HF = transformers.DeepseekV4ForCausalLM
HFConfig = transformers.DeepseekV4Config


def pair(name: str, seed: int = 0):
    kwargs = PARITY_CONFIGS[name]
    theirs = HF(HFConfig(**kwargs)).eval()
    randomize_(theirs, seed)
    ours = DeepseekV4ForCausalLM(DeepseekV4Config(**kwargs)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_match_transformers(name):
    ours, theirs = pair(name)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ids, use_cache=False).logits
        b = theirs(ids, use_cache=False).logits
    assert a.abs().max() > 1.0  # the model is not degenerate
    assert (a - b).abs().max().item() <= 1e-4


def test_compressed_branches_really_work():
    """Guard the parity configs: compressed entries exist and the indexer has to drop some."""
    ours, _ = pair("mixed_sqrtsoftplus")
    attn = ours.model.layers[1].self_attn
    seen = {}

    def hook(module, args, output):
        seen["keep"] = output

    handle = attn.compressor.indexer.register_forward_hook(hook)
    with torch.no_grad():
        ours(torch.randint(0, 97, (1, 23)), use_cache=False)
    handle.remove()
    keep = seen["keep"]  # [B, S, N] entries kept per query
    assert keep.shape[-1] == 11
    assert int(keep[0, -1].sum()) == ours.config.index_topk < 11


@pytest.mark.parametrize("name", ["mixed_sqrtsoftplus", "sigmoid_yarn"])
def test_greedy_generation_matches_transformers(name):
    ours, theirs = pair(name, seed=3)
    prompt = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = ours.generate(prompt, max_new_tokens=32, do_sample=False)
        b = theirs.generate(prompt, max_new_tokens=32, do_sample=False)
    assert a.shape[1] == 7 + 32
    assert torch.equal(a, b)


def test_checkpoints_cross_load(tmp_path):
    ours, theirs = pair("sigmoid_yarn", seed=5)
    ids = torch.randint(0, 97, (1, 19))
    with torch.no_grad():
        ref = ours(ids, use_cache=False).logits
    ours.save_pretrained(tmp_path / "ours")
    loaded_by_them = HF.from_pretrained(tmp_path / "ours").eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_by_us = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "theirs").eval()
    with torch.no_grad():
        assert (loaded_by_them(ids, use_cache=False).logits - ref).abs().max() <= 1e-4
        assert torch.equal(loaded_by_us(ids, use_cache=False).logits, ref)


def test_config_accepts_every_transformers_field_and_legacy_names():
    official_style = dict(
        num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=2, qk_rope_head_dim=64,
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1},
    )
    ours, theirs = DeepseekV4Config(**official_style), HFConfig(**official_style)
    import inspect

    own_fields = inspect.get_annotations(HFConfig)
    assert len(own_fields) > 40
    for field in own_fields:
        assert getattr(ours, field) == getattr(theirs, field) or field == "rope_parameters", field
    assert ours.layer_types == theirs.layer_types
    assert ours.rope_parameters["compress"]["rope_type"] == "yarn"
    assert ours.rope_parameters["compress"]["attention_factor"] == 1.0
    # transformers reads its own config back from ours
    assert HFConfig.from_dict(ours.to_dict()).layer_types == ours.layer_types


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_hidden_layers=2, layer_types=["sliding_attention"]), "layer_types"),
        (dict(num_hidden_layers=1, mlp_layer_types=["dense"]), "mlp_layer_types"),
        (dict(num_key_value_heads=2), "num_key_value_heads"),
        (dict(o_groups=7, num_attention_heads=2, head_dim=8), "o_groups"),
        (dict(num_experts_per_tok=9, n_routed_experts=8), "num_experts_per_tok"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(compress_ratios=[0, 3]), "compress_ratios"),
        (dict(n_shared_experts=2), "n_shared_experts"),
        (dict(moe_backend="fastest"), "moe_backend"),
    ],
)
def test_config_rejects_inconsistent_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DeepseekV4Config(**kwargs)
