"""Checkpoint-level conversion on synthetic official-named checkpoints: formats, errors naming the
tensor, streaming with a memory cap, inspect/CLI, and stock transformers reading our FP8 output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dsv41.quantization import (
    QuantizationError,
    QuantSpec,
    checkpoint_format,
    dequantize_checkpoint,
    load_dequantized_state_dict,
    quantize_checkpoint,
)
from dsv41.quantization import codecs as C
from dsv41.quantization.inspection import inspect_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def official_state(seed=0, hidden=64, inter=32, experts=2, layers=1, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.05):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    sd = {"embed.weight": r(96, hidden), "head.weight": r(96, hidden), "norm.weight": torch.ones(hidden, dtype=dtype)}
    for i in range(layers):
        p = f"layers.{i}."
        sd.update(
            {
                p + "attn.wq_a.weight": r(32, hidden),
                p + "attn.wq_b.weight": r(64, 32),
                p + "attn.wkv.weight": r(32, hidden),
                p + "attn.wo_a.weight": r(64, 32),
                p + "attn.wo_b.weight": r(hidden, 64),
                p + "attn.q_norm.weight": torch.ones(32, dtype=dtype),
                p + "attn.attn_sink": torch.zeros(2, dtype=torch.float32),
                p + "attn.compressor.wkv.weight": r(32, hidden),
                p + "attn.compressor.ape": r(4, 32).float(),
                p + "attn_norm.weight": torch.ones(hidden, dtype=dtype),
                p + "hc_attn_fn": r(24, 4 * hidden).float(),
                p + "hc_attn_scale": torch.ones(3),
                p + "ffn.gate.weight": r(experts, hidden),
                p + "ffn.gate.tid2eid": torch.randint(0, experts, (96, 2), generator=g),
                p + "ffn.shared_experts.w1.weight": r(inter, hidden),
                p + "ffn.shared_experts.w2.weight": r(hidden, inter),
                p + "ffn.shared_experts.w3.weight": r(inter, hidden),
            }
        )
        for e in range(experts):
            sd[p + f"ffn.experts.{e}.w1.weight"] = r(inter, hidden)
            sd[p + f"ffn.experts.{e}.w2.weight"] = r(hidden, inter)
            sd[p + f"ffn.experts.{e}.w3.weight"] = r(inter, hidden)
    return sd


def write_ckpt(path: Path, sd: dict, shards: int = 1, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(sd)
    if shards == 1:
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    else:
        wm = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[i::shards]}
            save_file(part, path / fname, metadata={"format": "pt"})
            wm.update({n: fname for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "deepseek_v4", "hidden_size": 64}))
    (path / "tokenizer_config.json").write_text("{}")
    (path / "modeling_deepseek_v4.py").write_text("# modeling file copied with the checkpoint\n")
    return path


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_ckpt(tmp_path_factory.mktemp("src") / "bf16", official_state(), shards=2)


SPECS = {
    "fp8-ue8m0": (QuantSpec("fp8", block=(32, 32)), 2.0**-4),
    "fp8-float-fp4experts": (QuantSpec("fp8", block=(32, 32), scale_fmt="float", expert_dtype="fp4"), 0.25),
    "mxfp4": (QuantSpec("mxfp4"), 0.25),
    "int8": (QuantSpec("int8", group_size=32), 1 / 127),
    "int4-rtn": (QuantSpec("int4-rtn", group_size=32), 1 / 7),
}


@pytest.mark.parametrize("label", list(SPECS))
def test_quantize_load_roundtrip(ckpt, tmp_path, label):
    spec, rel = SPECS[label]
    before = tree_digest(ckpt)
    out = tmp_path / label
    quantize_checkpoint(ckpt, out, spec)
    assert tree_digest(ckpt) == before  # input never modified
    # self-contained: side files copied, quantization_config added
    assert (out / "tokenizer_config.json").exists() and (out / "modeling_deepseek_v4.py").exists()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dsv41_method"] == spec.method
    raw = {}
    for f in out.glob("*.safetensors"):
        raw.update(load_file(f))  # the official safetensors reader accepts our writer's files
    ref = official_state()
    if spec.method == "fp8":
        assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [32, 32]
        assert raw["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
        if spec.scale_fmt == "ue8m0":
            assert raw["layers.0.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
            assert tuple(raw["layers.0.attn.wq_a.scale"].shape) == (1, 2)
        else:
            assert raw["layers.0.attn.wq_a.weight_scale_inv"].dtype == torch.float32
            assert qc["expert_dtype"] == "fp4" and raw["layers.0.ffn.experts.1.w2.weight"].dtype == torch.int8
            assert tuple(raw["layers.0.ffn.experts.1.w2.weight"].shape) == (64, 16)
    if spec.method == "mxfp4":
        assert raw["layers.0.ffn.experts.0.w1.weight"].dtype == torch.int8
        assert tuple(raw["layers.0.ffn.experts.0.w1.scale"].shape) == (32, 2)
        assert raw["layers.0.attn.wq_a.weight"].dtype == torch.bfloat16  # dense layers untouched
        assert "layers.0.attn.wq_a" in qc["modules_to_not_convert"]
    if spec.method.startswith("int"):
        assert raw["layers.0.attn.wq_a.weight_scale"].dtype == torch.float16
        assert raw["layers.0.attn.wq_a.weight"].dtype == (torch.int8 if spec.method == "int8" else torch.uint8)
    # never-quantized tensors are bit-identical
    for name in ("embed.weight", "head.weight", "layers.0.ffn.gate.weight", "layers.0.ffn.gate.tid2eid", "layers.0.hc_attn_fn"):
        assert torch.equal(raw[name], ref[name])
    sd = load_dequantized_state_dict(out, torch.float32)
    assert set(sd) == set(ref)
    for name, t in ref.items():
        if t.is_floating_point() and t.dim() == 2:
            err = (sd[name] - t.float()).abs().max()
            assert err <= rel * t.float().abs().max() * 1.01, (name, float(err))
    assert checkpoint_format(out)["quantized"]
    # dequantize -> bf16 folder equal to the loader's tensors; requantizing it reproduces the values
    dq = tmp_path / "dq"
    dequantize_checkpoint(out, dq)
    assert "quantization_config" not in json.loads((dq / "config.json").read_text())
    sd2 = load_file(next(dq.glob("*.safetensors"))) if len(list(dq.glob("*.safetensors"))) == 1 else load_dequantized_state_dict(dq)
    for name in ref:
        assert torch.equal(sd2[name], sd[name].to(sd2[name].dtype)), name
    if not (spec.method == "fp8" and spec.scale_fmt == "float"):
        rq = tmp_path / "rq"
        quantize_checkpoint(dq, rq, spec)
        sd3 = load_dequantized_state_dict(rq, torch.float32)
        for name in ref:
            assert torch.equal(sd3[name].float(), sd[name].float()), name


def test_sharded_output_and_inspect(ckpt, tmp_path):
    out = tmp_path / "q"
    res = quantize_checkpoint(ckpt, out, QuantSpec("fp8", block=(32, 32)), max_shard_bytes=20_000)
    assert res["shards"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["layers.0.attn.wq_a.scale"] == index["weight_map"]["layers.0.attn.wq_a.weight"]
    info = inspect_checkpoint(out)
    rows = {r["name"]: r for r in info["tensors"]}
    assert rows["layers.0.attn.wq_a.weight"]["format"] == "fp8-e4m3 block 32x32"
    assert rows["layers.0.attn.wq_a.scale"]["format"] == "fp8 scale ue8m0"
    assert rows["layers.0.attn.wq_a.weight"]["bytes"] == 32 * 64
    assert info["total_bytes"] == sum(r["bytes"] for r in info["tensors"])
    assert info["files"] == res["shards"]


def test_gptoss_blocks_are_readable(tmp_path):
    w = torch.randn(2, 16, 64)
    q, s = C.quantize_mxfp4(w)
    blocks, scales = C.mxfp4_to_gptoss(q, s)
    src = write_ckpt(tmp_path / "g", {"model.layers.0.mlp.experts.down_proj_blocks": blocks, "model.layers.0.mlp.experts.down_proj_scales": scales, "model.norm.weight": torch.ones(4)})
    sd = load_dequantized_state_dict(src, torch.float32)
    assert set(sd) == {"model.layers.0.mlp.experts.down_proj", "model.norm.weight"}
    assert torch.equal(sd["model.layers.0.mlp.experts.down_proj"], C.dequantize_mxfp4(q, s))
    assert inspect_checkpoint(src)["bytes_by_format"]["mxfp4 gpt-oss blocks"] == blocks.numel()


# ----------------------------------------------------------------------------- bad input


def test_unknown_method_and_block_not_dividing(ckpt, tmp_path):
    with pytest.raises(QuantizationError, match="expected one of fp8, mxfp4, int8, int4-rtn, int4-gptq, found 'int3'"):
        QuantSpec("int3")
    with pytest.raises(QuantizationError, match=r"tensor 'layers\.0\.[\w.]+\.weight': FP8 block size 128x128 does not divide shape \[(32, 64|64, 32)\]"):
        quantize_checkpoint(ckpt, tmp_path / "o", QuantSpec("fp8"))
    with pytest.raises(QuantizationError, match=r"tensor 'layers\.0\.[\w.]+\.weight': group size 48 does not divide the input dimension (32|64)"):
        quantize_checkpoint(ckpt, tmp_path / "o", QuantSpec("int4-rtn", group_size=48))
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
    # DeepSeek's partial edge blocks on request: scale grid uses ceil
    quantize_checkpoint(ckpt, tmp_path / "p", QuantSpec("fp8", partial_blocks=True))
    raw = load_file(tmp_path / "p" / "model.safetensors")
    assert tuple(raw["layers.0.attn.wq_a.scale"].shape) == (1, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_named(tmp_path, bad):
    sd = official_state()
    sd["layers.0.ffn.experts.1.w3.weight"][3, 7] = bad
    src = write_ckpt(tmp_path / "src", sd)
    before = tree_digest(src)
    with pytest.raises(QuantizationError, match=r"'layers\.0\.ffn\.experts\.1\.w3\.weight'.*index \[3, 7\]"):
        quantize_checkpoint(src, tmp_path / "o", QuantSpec("mxfp4"))
    assert tree_digest(src) == before and not (tmp_path / "o").exists()


def test_already_quantized_refused(ckpt, tmp_path):
    q = tmp_path / "q"
    quantize_checkpoint(ckpt, q, QuantSpec("int8", group_size=32))
    with pytest.raises(QuantizationError, match=r"config\.json: field 'quantization_config' present"):
        quantize_checkpoint(q, tmp_path / "o", QuantSpec("fp8", block=(32, 32)))
    cfg = json.loads((q / "config.json").read_text())
    del cfg["quantization_config"]
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=r"tensor layers\.0\.\S+ \(.*\) shows the checkpoint is already quantized"):
        quantize_checkpoint(q, tmp_path / "o", QuantSpec("fp8", block=(32, 32)))
    with pytest.raises(QuantizationError, match="must not be the input folder"):
        quantize_checkpoint(ckpt, ckpt, QuantSpec("fp8", block=(32, 32)))


def test_missing_and_misshaped_scales(ckpt, tmp_path):
    q = tmp_path / "q"
    quantize_checkpoint(ckpt, q, QuantSpec("fp8", block=(32, 32)))
    raw = {}
    for f in q.glob("*.safetensors"):
        raw.update(load_file(f))
    missing = dict(raw)
    del missing["layers.0.attn.wkv.scale"]
    write_ckpt(tmp_path / "m", missing)
    with pytest.raises(QuantizationError, match=r"tensor 'layers\.0\.attn\.wkv\.weight' is torch\.float8_e4m3fn but its scale is missing"):
        load_dequantized_state_dict(tmp_path / "m")
    bad = dict(raw)
    bad["layers.0.attn.wkv.scale"] = raw["layers.0.attn.wkv.scale"].view(torch.uint8).repeat(1, 3).view(torch.float8_e8m0fnu)
    write_ckpt(tmp_path / "b", bad)
    with pytest.raises(QuantizationError, match=r"tensor 'layers\.0\.attn\.wkv\.weight' \(fp8\): scale 'layers\.0\.attn\.wkv\.scale' shape expected"):
        dequantize_checkpoint(tmp_path / "b", tmp_path / "bo")
    q4 = tmp_path / "q4"
    quantize_checkpoint(ckpt, q4, QuantSpec("mxfp4"))
    raw4 = {}
    for f in q4.glob("*.safetensors"):
        raw4.update(load_file(f))
    raw4["layers.0.ffn.experts.0.w1.scale"] = raw4["layers.0.ffn.experts.0.w1.scale"][:, :1].contiguous()
    write_ckpt(tmp_path / "b4", raw4)
    with pytest.raises(QuantizationError, match=r"'layers\.0\.ffn\.experts\.0\.w1\.weight' \(fp4\): scale .* shape expected \[32, 2\], found \[32, 1\]"):
        load_dequantized_state_dict(tmp_path / "b4")
    orphan = {"layers.0.attn.wkv.weight_scale_inv": torch.ones(1, 2), "norm.weight": torch.ones(4)}
    write_ckpt(tmp_path / "or", orphan)
    with pytest.raises(QuantizationError, match=r"scale tensor 'layers\.0\.attn\.wkv\.weight_scale_inv' has no matching quantized weight"):
        load_dequantized_state_dict(tmp_path / "or")


# ----------------------------------------------------------------------------- streaming memory cap

_MEM_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from dsv41.quantization import QuantSpec, quantize_checkpoint, dequantize_checkpoint
    from dsv41.quantization.report import reset_peak_rss, rss_bytes, peak_rss_bytes
    src, out, dq = sys.argv[1:4]
    from dsv41.quantization import codecs as C
    C.quantize_fp8_block(torch.randn(256, 4096), (128, 128)); C.dequantize_fp8_block(*C.quantize_fp8_block(torch.randn(128, 256)))  # warm-up
    res = {}
    for label, fn in (
        ("quantize", lambda: quantize_checkpoint(src, out, QuantSpec("fp8"), chunk_bytes=2 << 20)),
        ("dequantize", lambda: dequantize_checkpoint(out, dq, chunk_bytes=2 << 20)),
    ):
        assert reset_peak_rss()
        base = rss_bytes()
        fn()
        res[label] = peak_rss_bytes() - base
    print(json.dumps(res))
    """
)


def test_streaming_conversion_under_memory_cap(tmp_path):
    # two shards of 48 MiB each (bf16); the conversion must stay under a 32 MiB working-set cap
    cap = 32 * 2**20
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "big"
    src.mkdir()
    names = []
    for s in range(2):
        part = {f"layers.{s}.ffn.shared_experts.w{k}.weight": (torch.randn(2048, 4096, generator=g) * 0.02).to(torch.bfloat16) for k in (1, 3, 2)}
        names += list(part)
        save_file(part, src / f"model-0000{s + 1}-of-00002.safetensors")
        del part
    shard_bytes = [f.stat().st_size for f in src.glob("*.safetensors")]
    assert min(shard_bytes) > cap
    wm = {n: f"model-0000{int(n.split('.')[1]) + 1}-of-00002.safetensors" for n in names}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (src / "config.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, str(src), str(tmp_path / "q"), str(tmp_path / "dq")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks["quantize"] < cap and peaks["dequantize"] < cap, (peaks, shard_bytes)
    q = load_file(tmp_path / "q" / "model.safetensors")
    assert q["layers.1.ffn.shared_experts.w3.weight"].dtype == torch.float8_e4m3fn
    assert tuple(q["layers.1.ffn.shared_experts.w3.scale"].shape) == (16, 32)
    assert tuple(q["layers.1.ffn.shared_experts.w2.scale"].shape) == (16, 32)


# ----------------------------------------------------------------------------- CLI


def test_cli_quantize_inspect_dequantize(ckpt, tmp_path):
    from dsv41.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["quantize", "--model", str(ckpt), "--out", str(tmp_path / "q"), "--method", "int4-rtn"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "q")])
    assert r.exit_code == 0 and "int4 g32" in r.output and "total:" in r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "q"), "--json"])
    info = json.loads(r.output)
    assert info["quantization_config"]["bits"] == 4
    r = runner.invoke(app, ["dequantize", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["quantize", "--model", str(ckpt), "--out", str(tmp_path / "x"), "--method", "nf3"])
    assert r.exit_code == 2 and "found 'nf3'" in r.output
    r = runner.invoke(app, ["quantize", "--model", str(ckpt), "--out", str(tmp_path / "x"), "--method", "fp8"])
    assert r.exit_code == 2 and "does not divide shape" in r.output
    r = runner.invoke(app, ["quantize", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "x"), "--method", "int8"])
    assert r.exit_code == 2 and "already quantized" in r.output


# ----------------------------------------------------------------------------- stock transformers


def test_stock_transformers_reads_our_fp8(tmp_path):
    """Our FP8 (V4 ue8m0 and V3 float + FP4 experts) output loads through transformers'
    FineGrainedFP8 path (CPU: dequantized on load) with the same weights as our own loader."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(
        vocab_size=64, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=2, o_groups=2, o_lora_rank=32,
        index_n_heads=2, index_head_dim=32, index_topk=4, sliding_window=8, max_position_embeddings=64,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    )
    torch.manual_seed(0)
    DeepseekV4ForCausalLM(cfg).save_pretrained(tmp_path / "ref")
    x = torch.randint(0, 64, (1, 12))
    for spec in (QuantSpec("fp8", block=(32, 32)), QuantSpec("fp8", block=(32, 32), scale_fmt="float", expert_dtype="fp4")):
        quantize_checkpoint(tmp_path / "ref", tmp_path / "q", spec, overwrite=True)
        dequantize_checkpoint(tmp_path / "q", tmp_path / "dq", torch.float32, overwrite=True)
        a = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
        b = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "dq", dtype=torch.float32).eval()
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        for k in sa:
            # transformers dequantizes into bf16 on CPU; ours was written in fp32
            assert torch.allclose(sa[k].float(), sb[k].float(), rtol=2**-8, atol=1e-6), k
        with torch.no_grad():
            assert torch.allclose(a(x).logits, b(x).logits, atol=2e-2)
