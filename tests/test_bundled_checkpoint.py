"""The trained checkpoint shipped in the repository: loads everywhere, is actually trained,
generates deterministically, and the generate/chat commands handle bad input."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from dsv41 import BUNDLED_CHECKPOINT
from dsv41.cli import app
from dsv41.training.data import encode_corpus, pack, read_text, split_text

SUMMARY = json.loads((BUNDLED_CHECKPOINT / "training_summary.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BUNDLED_CHECKPOINT)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(BUNDLED_CHECKPOINT, trust_remote_code=True).eval()


def test_checkpoint_is_small_self_contained_and_official(model):
    files = {p.name for p in BUNDLED_CHECKPOINT.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", "modeling_deepseek_v4.py", "LICENSE-NONCOMMERCIAL"} <= files
    size = sum(p.stat().st_size for p in BUNDLED_CHECKPOINT.iterdir() if p.is_file())
    assert size <= 30 * 2**20
    config = model.config
    assert set(config.layer_types) == {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}
    assert set(config.mlp_layer_types) == {"hash_moe", "moe"} and config.n_routed_experts >= 8
    assert type(model).__module__.startswith("transformers_modules")
    from safetensors import safe_open

    with safe_open(str(BUNDLED_CHECKPOINT / "model.safetensors"), "pt") as f:
        assert "layers.0.attn.wq_a.weight" in f.keys()


def test_stock_transformers_gives_the_same_logits(model, tokenizer):
    stock = transformers.DeepseekV4ForCausalLM.from_pretrained(BUNDLED_CHECKPOINT).eval()
    ids = tokenizer("ROMEO: What light through yonder window breaks?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (stock(ids, use_cache=False).logits - model(ids, use_cache=False).logits).abs().max() <= 1e-4


def test_validation_loss_is_below_recorded_threshold(model, tokenizer, shared_datasets):
    """A held-out slice of the validation split: a broken or untrained model fails this."""
    files = [shared_datasets / "tinyshakespeare" / "input.txt", shared_datasets / "gutenberg" / "pg1342.txt", shared_datasets / "gutenberg" / "pg1661.txt"]
    val = [split_text(read_text(f), 0.05)[1] for f in files]
    blocks = pack(encode_corpus(tokenizer, val), 256)[::4][:6]
    with torch.no_grad():
        logits = model(blocks[:, :-1], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert loss < SUMMARY["val_loss_threshold"] < SUMMARY["unigram_val_loss"]


def test_seeded_generation_is_deterministic(model, tokenizer):
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(model.generate(ids, max_new_tokens=12, do_sample=True, top_k=40))
    assert torch.equal(*outs)
    assert outs[0].shape[1] > ids.shape[1]


def test_chat_template_round_trip(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Holmes?"}, {"role": "assistant", "content": "A detective."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|begin_of_text|><|system|>Be brief.<|end_of_turn|><|user|>Who is Holmes?<|end_of_turn|><|assistant|>A detective.<|end_of_turn|>"
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.decode(ids) == text
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>Who is Holmes?<|end_of_turn|><|assistant|>")


runner = CliRunner()


def test_generate_streams_with_the_default_model():
    result = runner.invoke(app, ["generate", "First Citizen:", "--max-new-tokens", "8", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("First Citizen:") and len(result.stdout.strip()) > len("First Citizen:")


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--model", "/nonexistent/model"], "looked for"),
        (["generate", "   "], "prompt is empty"),
        (["generate", "hi", "--max-new-tokens", "0"], "max-new-tokens must be positive"),
    ],
)
def test_generate_bad_input(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert message in result.output


def test_chat_loop_uses_the_template():
    result = runner.invoke(app, ["chat", "--max-new-tokens", "6"], input="Hello there\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "model>" in result.output


def test_bundled_modeling_files_are_the_current_ones():
    """trust_remote_code users of the bundled checkpoint run exactly the package's modeling code."""
    from pathlib import Path

    import dsv41.modeling.checkpoint_deepseek_v4 as ck
    from dsv41.modeling.checkpoint_deepseek_v4 import MODELING_FILES

    package = Path(ck.__file__).parent
    for name in MODELING_FILES:
        assert (BUNDLED_CHECKPOINT / name).read_text() == (package / name).read_text(), f"{name} is stale: copy modeling/{name} into the checkpoint"
