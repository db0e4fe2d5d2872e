"""End to end on a tiny random DeepSeek-V4 (our modeling): save -> quantize -> load -> logits,
GPTQ with a calibration set, bitsandbytes on CPU, and the quality report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv41.modeling import DeepseekV4Config, DeepseekV4ForCausalLM
from dsv41.quantization import QuantSpec, load_dequantized_state_dict, load_quantized_model, quantize_checkpoint
from dsv41.quantization.gptq import collect_hessians
from dsv41.quantization.names import hf_to_official

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modeling_utils import tiny_config_kwargs  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")

# every input dimension a multiple of 64 (bitsandbytes' CPU kernels need it) and of 32 (FP8 32x32, FP4 groups)
TINY = tiny_config_kwargs(
    vocab_size=512, hidden_size=64, moe_intermediate_size=64, head_dim=32, q_lora_rank=64, o_lora_rank=32,
    num_attention_heads=2, index_n_heads=32, index_head_dim=32,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**TINY)).eval()
    path = tmp_path_factory.mktemp("tiny") / "bf16"
    model.to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return {"calib": torch.randint(0, 512, (8, 32), generator=g), "eval": torch.randint(0, 512, (4, 32), generator=g)}


def _kl(ref_logits, logits) -> float:
    return float(F.kl_div(logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1), log_target=True, reduction="batchmean"))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def ref_logits(tiny_dir, batches):
    return _logits(DeepseekV4ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval(), batches["eval"])


def test_names_match_modeling_table(tiny_dir):
    from dsv41.modeling.checkpoint_deepseek_v4 import to_official

    model = DeepseekV4ForCausalLM(DeepseekV4Config(**TINY))
    for name, p in model.named_parameters():
        if p.dim() == 2 and name.endswith(".weight"):
            (official,) = to_official({name: p}).keys()
            assert hf_to_official(name) == official, name


# (method spec, max mean KL vs bf16 on random tokens)
FORMATS = {
    "fp8": (QuantSpec("fp8", block=(32, 32)), 1e-2),
    "fp8-v3-fp4experts": (QuantSpec("fp8", block=(32, 32), scale_fmt="float", expert_dtype="fp4"), 4e-2),
    "mxfp4": (QuantSpec("mxfp4"), 2e-2),
    "int8": (QuantSpec("int8", group_size=32), 5e-3),
    "int4-rtn": (QuantSpec("int4-rtn", group_size=32), 5e-2),
}


@pytest.mark.parametrize("label", list(FORMATS))
def test_quantized_tiny_model_logits(tiny_dir, batches, ref_logits, tmp_path, label):
    spec, max_kl = FORMATS[label]
    out = tmp_path / label
    quantize_checkpoint(tiny_dir, out, spec)
    model = load_quantized_model(DeepseekV4ForCausalLM, out, dtype=torch.float32)
    logits = _logits(model, batches["eval"])
    kl = _kl(ref_logits, logits)
    print(f"{label}: mean KL {kl:.2e}")
    assert 0 < kl < max_kl, kl
    agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    assert agree > 0.7
    # the loader's weights are exactly the dequantized checkpoint tensors
    sd = load_dequantized_state_dict(out, torch.float32)
    assert torch.equal(model.model.layers[1].self_attn.q_a_proj.weight, sd["layers.1.attn.wq_a.weight"])
    assert torch.equal(model.model.layers[2].mlp.experts.down_proj[3], sd["layers.2.ffn.experts.3.w2.weight"])
    # saved checkpoint reloads identically: dequantized model -> save -> from_pretrained -> same logits
    model.save_pretrained(tmp_path / "resaved")
    again = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "resaved", dtype=torch.float32).eval()
    assert torch.equal(_logits(again, batches["eval"]), logits)
    twice = load_quantized_model(DeepseekV4ForCausalLM, out, dtype=torch.float32)
    assert torch.equal(_logits(twice, batches["eval"]), logits)


def test_load_reports_mismatch(tiny_dir, tmp_path):
    from dsv41.quantization import QuantizationError

    out = tmp_path / "q"
    quantize_checkpoint(tiny_dir, out, QuantSpec("int8", group_size=32))
    cfg = json.loads((out / "config.json").read_text())
    cfg["n_routed_experts"] = 5  # the checkpoint has 6 experts
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=r"tensor 'layers\.0\.ffn\.gate\.weight': the model expects shape \[5, 64\], found \[6, 64\]"):
        load_quantized_model(DeepseekV4ForCausalLM, out)


# FP8 on the kernels' 128x128 blocks (partial edge blocks: the tiny dims are 64) and FP4 experts
KEEPABLE = {
    "fp8": QuantSpec("fp8", partial_blocks=True),
    "fp8-fp4experts": QuantSpec("fp8", partial_blocks=True, expert_dtype="fp4"),
    "mxfp4": QuantSpec("mxfp4"),
}


@pytest.mark.parametrize("label", list(KEEPABLE))
def test_experts_kept_quantized_on_cpu(tiny_dir, batches, tmp_path, label):
    """quantized_experts='keep': routed experts stay FP8 / FP4 in memory (smaller model), the CPU
    path dequantizes the experts hit per call, and the logits equal the fully dequantized model."""
    from dsv41.quantization.experts import DeepseekV4QuantizedExperts

    out = tmp_path / label
    quantize_checkpoint(tiny_dir, out, KEEPABLE[label])
    dense = load_quantized_model(DeepseekV4ForCausalLM, out, dtype=torch.float32, quantized_experts="dequantize")
    kept = DeepseekV4ForCausalLM.from_pretrained(out, dtype=torch.float32, quantized_experts="keep", device_map="cpu")
    layers = kept.model.layers
    assert all(isinstance(layer.mlp.experts, DeepseekV4QuantizedExperts) for layer in layers)
    assert layers[0].mlp.experts.fmt == ("fp8" if label == "fp8" else "mxfp4")
    assert layers[0].mlp.experts.backend == "cpu_grouped"
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    assert nbytes(kept) < 0.8 * nbytes(dense)
    ids = batches["eval"]
    assert torch.equal(_logits(kept, ids), _logits(dense, ids))
    kept.set_moe_backend("reference")
    torch.testing.assert_close(_logits(kept, ids), _logits(dense, ids), atol=1e-5, rtol=0)
    # cached decoding through the kept experts (one token per step) == the dense model
    gen = dict(max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(kept.generate(ids[:1, :8], **gen), dense.generate(ids[:1, :8], **gen))
    # casting the model changes the activations' dtype, never the stored codes / scales
    kept.to(torch.bfloat16)
    assert kept.model.layers[0].mlp.experts.gate_up_q.dtype in (torch.float8_e4m3fn, torch.uint8)
    agree = (_logits(kept, ids).argmax(-1) == _logits(dense, ids).argmax(-1)).float().mean()
    assert agree > 0.9
    # saving would have to invent dense weights: refused before anything is written
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts holds routed experts kept in"):
        kept.save_pretrained(tmp_path / "resaved")
    assert not (tmp_path / "resaved").exists()


def test_experts_that_do_not_fit_the_kernels(tiny_dir, tmp_path, caplog):
    """FP8 on 32x32 blocks cannot be read by the 128x128-block kernels: 'keep' names the tensor,
    'auto' with the Triton backend falls back to dequantizing (with a warning), on CPU 'auto'
    dequantizes silently; int8 experts likewise; a bad mode is refused."""
    from dsv41.quantization import QuantizationError
    from dsv41.quantization.loading import _expert_layers_to_keep

    out = tmp_path / "fp8-32"
    quantize_checkpoint(tiny_dir, out, QuantSpec("fp8", block=(32, 32)))
    with pytest.raises(QuantizationError, match=r"tensor 'layers\.\d+\.ffn\.experts\.\d+\.w[123]\.weight' is fp8 with scale block \(32, 32\)"):
        load_quantized_model(DeepseekV4ForCausalLM, out, quantized_experts="keep")
    with caplog.at_level("WARNING"):
        assert _expert_layers_to_keep(out, "auto", "triton") == {}
    assert "dequantizing the routed experts of layer 0" in caplog.text
    assert _expert_layers_to_keep(out, "auto", "cpu_grouped") == {}
    int8 = tmp_path / "int8"
    quantize_checkpoint(tiny_dir, int8, QuantSpec("int8", group_size=32))
    with pytest.raises(QuantizationError, match=r"is int8; the expert kernels read FP8 on 128x128 blocks or FP4"):
        load_quantized_model(DeepseekV4ForCausalLM, int8, quantized_experts="keep")
    with pytest.raises(QuantizationError, match=r"quantized_experts must be one of \['auto', 'keep', 'dequantize'\], got 'always'"):
        load_quantized_model(DeepseekV4ForCausalLM, int8, quantized_experts="always")
    with pytest.raises(ValueError, match=r"quantized checkpoints load onto one device"):
        DeepseekV4ForCausalLM.from_pretrained(int8, device_map={"model.embed_tokens": "cpu", "lm_head": "meta"})


def test_gptq_model_beats_rtn(tiny_dir, batches, ref_logits, tmp_path):
    model = DeepseekV4ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    hessians = collect_hessians(model, batches["calib"].split(4), bits=4, group_size=32)
    # every dense linear (grouped wo_a included) and every routed expert projection got a Hessian
    assert "layers.0.attn.wo_a.weight" in hessians and hessians["layers.0.attn.wo_a.weight"].dim() == 3
    assert "layers.1.ffn.experts.0.w2.weight" in hessians and "layers.3.attn.indexer.wq_b.weight" in hessians
    fake = _logits(model, batches["eval"])  # the model now holds its GPTQ fake-quantized weights
    out = tmp_path / "gptq"
    res = quantize_checkpoint(tiny_dir, out, QuantSpec("int4-gptq", group_size=32, hessians=hessians))
    assert res["quantization_config"]["algorithm"] == "gptq"
    loaded = load_quantized_model(DeepseekV4ForCausalLM, out, dtype=torch.float32)
    written = _logits(loaded, batches["eval"])
    assert torch.allclose(fake, written, atol=1e-5)  # the checkpoint holds what the calibration pass computed
    quantize_checkpoint(tiny_dir, tmp_path / "rtn", QuantSpec("int4-rtn", group_size=32))
    rtn = _logits(load_quantized_model(DeepseekV4ForCausalLM, tmp_path / "rtn", dtype=torch.float32), batches["eval"])
    ref32 = _logits(DeepseekV4ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval(), batches["eval"])
    assert _kl(ref32, written) < _kl(ref32, rtn)


def test_bitsandbytes_cpu_experts_included(tiny_dir, batches, ref_logits):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from dsv41.quantization.bnb import BnbStack, bnb_model_bytes, load_bnb_model

    ref_bytes = bnb_model_bytes(DeepseekV4ForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16))
    for cfg, max_kl in (
        (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16), 3e-2),
        (BitsAndBytesConfig(load_in_8bit=True), 1e-2),
    ):
        model = load_bnb_model(DeepseekV4ForCausalLM, tiny_dir, cfg).eval()
        assert model.bnb_extra_counts == {"experts": 4, "grouped": 4}
        assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, BnbStack)
        assert type(model.model.layers[0].self_attn.q_a_proj).__name__ in ("Linear4bit", "Linear8bitLt")
        kl = _kl(ref_logits, _logits(model, batches["eval"]))
        assert 0 < kl < max_kl, kl
        assert bnb_model_bytes(model) < 0.7 * ref_bytes


def test_quality_report_on_tiny_model(tiny_dir, tiny_tokenizer_dir, tmp_path, shared_datasets):
    import shutil

    from dsv41.quantization.report import run_quality_report

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    text = (shared_datasets / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    report = run_quality_report(
        model_dir, tmp_path / "rep", text[-20_000:], text[:20_000], methods=("fp8", "int8", "int4-gptq"),
        seq_len=64, max_tokens=512, calib_tokens=256, log=lambda *_: None,
    )
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"bf16", "fp8", "int8", "int4-gptq"}
    assert rows["bf16"]["mean_kl"] == 0 and rows["bf16"]["top1_agreement"] == 1.0
    for m in ("fp8", "int8", "int4-gptq"):
        r = rows[m]
        assert r["tokens"] == 8 * 63
        assert 0 < r["mean_kl"] and r["top1_ci95"][0] <= r["top1_agreement"] <= r["top1_ci95"][1]
        assert r["checkpoint_bytes"] < rows["bf16"]["checkpoint_bytes"] and r["peak_rss_bytes"] > 0
    assert rows["int8"]["mean_kl"] < rows["int4-gptq"]["mean_kl"]
    assert rows["fp8"]["settings"]["block"] == [32, 32] and rows["int8"]["settings"]["group_size"] == 32
    assert rows["int4-gptq"]["size_ratio_vs_bf16"] < rows["int8"]["size_ratio_vs_bf16"] < 1
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["rows"][1]["method"] == "fp8"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| int4-gptq |" in md and "top-1 agreement (95% CI)" in md
    assert (tmp_path / "rep" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
