"""The training recipe: deterministic with a seed, resumable, writes checkpoint, plots and MoE health."""

from __future__ import annotations

import json

import pytest
import torch

from dsv41.modeling import DeepseekV4ForCausalLM
from dsv41.training.data import perplexity, unigram_cross_entropy
from dsv41.training.train import TrainConfig, train

SMALL_ARCH = dict(
    hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, head_dim=16,
    q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=8, o_groups=2, o_lora_rank=8, index_n_heads=2,
    index_head_dim=16, index_topk=4, sliding_window=8, hc_mult=2, hc_sinkhorn_iters=3,
    compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"], qk_rope_head_dim=8,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_datasets):
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    path.write_text((shared_datasets / "tinyshakespeare" / "input.txt").read_text()[:60_000])
    return path


def run(corpus, out, **overrides):
    cfg = dict(data=[str(corpus)], out=str(out), vocab_size=300, seq_len=32, batch_size=4, steps=12, warmup=2, eval_every=6, eval_batches=2, save_every=6, arch=dict(SMALL_ARCH))
    cfg.update(overrides)
    return train(TrainConfig(**cfg))


def test_training_is_deterministic_and_complete(corpus, tmp_path):
    first = run(corpus, tmp_path / "a")
    second = run(corpus, tmp_path / "b")
    log_a = json.loads((tmp_path / "a" / "train_log.json").read_text())
    log_b = json.loads((tmp_path / "b" / "train_log.json").read_text())
    assert [r["loss"] for r in log_a["train"]] == [r["loss"] for r in log_b["train"]]
    assert first["final_val_loss"] == second["final_val_loss"]
    losses = [r["loss"] for r in log_a["train"]]
    assert losses[-1] < losses[0]
    for name in ("loss_curve.png", "expert_bias.png", "README.md", "config.json", "tokenizer.json", "model.safetensors", "generation_config.json"):
        assert (tmp_path / "a" / name).exists(), name
    # MoE health: per-layer tokens per expert every step, imbalance reported, bias moved for routed layers
    assert len(log_a["train"][0]["expert_load"]) == 3
    assert sum(log_a["train"][0]["expert_load"][1]) == 4 * 32 * 2
    assert len(first["expert_load_imbalance_max_over_mean"]) == 3
    assert any(abs(b) > 0 for values in log_a["final_bias"].values() for b in values)
    model = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "a")
    assert model.config.vocab_size == 300


def test_interrupted_run_resumes_from_state(corpus, tmp_path):
    out = tmp_path / "r"
    reference = run(corpus, tmp_path / "ref")
    import dsv41.training.train as tr

    original = tr.evaluate
    calls = {"n": 0}

    def crash_after_first_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # second validation = step 12, after the step-6 state was saved
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    tr.evaluate = crash_after_first_save
    try:
        with pytest.raises(KeyboardInterrupt):
            run(corpus, out)
    finally:
        tr.evaluate = original
    assert (out / "train_state" / "step.json").exists()
    resumed = run(corpus, out, resume=True)
    assert resumed["final_val_loss"] == pytest.approx(reference["final_val_loss"], abs=1e-6)


def test_unigram_baseline_by_hand():
    # train: a a b ; val: a b  -> add-one counts a=3, b=2, c=1 over 6
    ce = unigram_cross_entropy([0, 0, 1], [0, 1], 3)
    expected = -(torch.log(torch.tensor(3 / 6)) + torch.log(torch.tensor(2 / 6))).item() / 2
    assert ce == pytest.approx(expected)
    assert perplexity(ce) == pytest.approx(6**0.5)  # 1 / sqrt(1/2 * 1/3)


def test_bf16_mixed_precision_run(corpus, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests made an fp32 Accelerator in this process
    try:
        summary = run(corpus, tmp_path / "bf16", precision="bf16", steps=4, eval_every=4, save_every=4)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert summary["final_val_loss"] < 10 and summary["final_val_loss"] == summary["final_val_loss"]  # finite, not NaN
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("layers.0.attn.wq_a.weight").dtype == torch.bfloat16
