"""MoE kernels against their PyTorch references, on CPU: Triton kernels under the interpreter
(TRITON_INTERPRET=1, set for this module only), the CPU fast path, the CUDA C++ source compiled
with nvcc (compile only), and the transformers experts-interface registration on a tiny random
DeepseekV4ForCausalLM."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dsv41.kernels import reference as ref
from dsv41.modeling.moe_deepseek_v4 import cpu_grouped_experts, reference_experts

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "kernels" / "csrc"


# The Triton interpreter must be chosen before triton is first imported (triton's own helpers are
# decorated at import time), and importing transformers' DeepseekV4 already imports triton. So the
# Triton tests run in this process only when it was started with TRITON_INTERPRET=1; otherwise
# test_triton_suite_under_interpreter runs them in a fresh subprocess that was.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def tm():
    if not INTERPRETER:
        pytest.skip("Triton interpreter tests run in the subprocess of test_triton_suite_under_interpreter")
    from dsv41.kernels import triton_moe

    return triton_moe


def test_triton_suite_under_interpreter():
    if INTERPRETER:
        pytest.skip("this process already runs the Triton tests directly")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-k",
         "not cpu_grouped and not cuda and not import_on_cpu and not suite_under and not _cpu"],
        env=env, capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout


def make_experts(e, h, i, dtype=torch.float32, limit=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        gate_up_proj=(torch.randn(e, 2 * i, h, generator=gen) * h**-0.5).to(dtype),
        down_proj=(torch.randn(e, h, i, generator=gen) * i**-0.5).to(dtype),
        limit=limit, num_experts=e,
    )


def routing(t, e, k, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else torch.empty(0, k, dtype=torch.long)
    return idx, torch.rand(t, k, generator=gen).to(dtype)


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(out, want, dtype):
    assert out.dtype == want.dtype and out.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    else:
        assert rel_err(out, want) <= 1e-2


# ------------------------------------------------------------------------------------ routing


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("t,e,k,bias", [(1, 8, 1, True), (7, 16, 8, True), (5, 12, 3, False), (3, 64, 6, True)])
def test_routing_matches_reference(tm, scoring, t, e, k, bias):
    gen = torch.Generator().manual_seed(t * 100 + e)
    logits = torch.randn(t, e, generator=gen) * 3
    b = torch.randn(e, generator=gen) * 0.2 if bias else None
    w_ref, i_ref = ref.route_reference(logits, k, scoring, b, 2.5)
    w, i = tm.route_triton(logits, k, scoring, b, 2.5)
    assert torch.equal(i, i_ref)  # both ordered by decreasing biased score
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)
    assert torch.allclose(w.sum(-1), torch.full((t,), 2.5), atol=1e-5)


def test_routing_without_renormalisation(tm):
    logits = torch.randn(4, 10)
    w_ref, i_ref = ref.route_reference(logits, 3, "sigmoid", None, 1.0, renormalize=False)
    w, i = tm.route_triton(logits, 3, "sigmoid", None, 1.0, renormalize=False)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 6])
def test_hash_routing_matches_reference(tm, k):
    gen = torch.Generator().manual_seed(k)
    vocab, e, t = 50, 16, 9
    tid2eid = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(vocab)])
    ids = torch.randint(0, vocab, (t,), generator=gen)
    logits = torch.randn(t, e, generator=gen)
    w_ref, i_ref = ref.route_reference(logits, k, "sqrtsoftplus", None, 1.5, input_ids=ids, tid2eid=tid2eid)
    w, i = tm.route_triton(logits, k, "sqrtsoftplus", None, 1.5, input_ids=ids, tid2eid=tid2eid)
    assert torch.equal(i, tid2eid[ids])
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)


def test_reference_routing_matches_transformers_router_cpu():
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter

    cfg = DeepseekV4Config(hidden_size=32, n_routed_experts=12, num_experts_per_tok=4, vocab_size=64)
    router = DeepseekV4TopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    router.e_score_correction_bias.normal_()
    x = torch.randn(6, 32)
    logits, w_tf, i_tf = router(x)
    w, i = ref.route_reference(logits, 4, cfg.scoring_func, router.e_score_correction_bias, cfg.routed_scaling_factor)
    order_tf, order = i_tf.argsort(-1), i.argsort(-1)
    assert torch.equal(i_tf.gather(1, order_tf), i.gather(1, order))
    torch.testing.assert_close(w_tf.gather(1, order_tf), w.gather(1, order), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("t,e,k,block_m", [(1, 8, 1, 16), (37, 8, 3, 16), (50, 16, 8, 4), (20, 64, 6, 16), (0, 4, 2, 16)])
def test_alignment_matches_reference(tm, t, e, k, block_m):
    idx, _ = routing(t, e, k)
    if t > 2:
        idx[1, 0] = e  # dropped slots (an EP sentinel and a negative id)
        idx[2, -1] = -1
    want = ref.align_reference(idx, e, block_m)
    got = tm.align_triton(idx, e, block_m, chunk=16)  # several chunks even for small inputs
    for field in ("sorted_ids", "block_expert", "num_padded", "slot_pos", "counts"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    # structure: every valid slot sits in a block of its expert; the inverse permutation inverts
    flat = idx.reshape(-1)
    valid = (flat >= 0) & (flat < e)
    pos = want.slot_pos.long()
    assert torch.equal(pos >= 0, valid)
    assert torch.equal(want.sorted_ids[pos[valid]].long(), torch.nonzero(valid).squeeze(-1))
    assert torch.equal(want.block_expert[pos[valid] // block_m].long(), flat[valid])
    assert int(want.num_padded) % block_m == 0


# ------------------------------------------------------------------------ Triton expert GEMMs

CASES = {
    "one_token": dict(t=1, e=8, h=64, i=32, k=2),
    "odd_hidden": dict(t=5, e=6, h=37, i=24, k=2),
    "idle_experts": dict(t=2, e=16, h=32, i=16, k=2),
    "top1": dict(t=9, e=4, h=48, i=32, k=1),
    "top8": dict(t=6, e=10, h=32, i=32, k=8),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_experts_match_reference(tm, case, dtype):
    c = CASES[case]
    ex = make_experts(c["e"], c["h"], c["i"], dtype, limit=0.8)
    idx, w = routing(c["t"], c["e"], c["k"])
    x = torch.randn(c["t"], c["h"]).to(dtype)
    if case == "idle_experts":
        assert idx.unique().numel() < c["e"]
    out = tm.triton_experts(ex, x, idx, w)
    assert_close(out, reference_experts(ex, x, idx, w), dtype)


def test_triton_experts_ignore_invalid_ids_and_zero_tokens(tm):
    ex = make_experts(6, 32, 16)
    idx, w = routing(4, 6, 3)
    idx[0, 1], idx[3, 0] = 6, -1
    x = torch.randn(4, 32)
    torch.testing.assert_close(tm.triton_experts(ex, x, idx, w), reference_experts(ex, x, idx, w), atol=1e-5, rtol=0)
    empty = tm.triton_experts(ex, x[:0], idx[:0], w[:0])
    assert empty.shape == (0, 32)


@pytest.mark.parametrize("block_m", [16, 64])
def test_triton_experts_prefill_block_size(tm, block_m):
    ex = make_experts(4, 32, 32)
    idx, w = routing(24, 4, 2)
    x = torch.randn(24, 32)
    out = tm.triton_experts(ex, x, idx, w, block_m=block_m)
    torch.testing.assert_close(out, reference_experts(ex, x, idx, w), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt,h,i", [("fp8", 160, 96), ("fp8", 64, 32), ("mxfp4", 64, 32), ("mxfp4", 96, 64)])
def test_triton_quantized_experts(tm, fmt, h, i, dtype):
    """Weights dequantized inside the kernel == the reference on the dequantized weights (FP8 with
    partial 128-blocks; MXFP4 with several 32-groups per row)."""
    dense = make_experts(5, h, i, limit=1.5)
    q = ref.QuantizedExperts.from_dense(fmt, dense.gate_up_proj, dense.down_proj, 1.5)
    gu, dn = q.dequantized(torch.float32)
    assert rel_err(gu, dense.gate_up_proj) < (0.05 if fmt == "fp8" else 0.2)
    deq = SimpleNamespace(gate_up_proj=gu.to(dtype), down_proj=dn.to(dtype), limit=1.5)
    idx, w = routing(3, 5, 2)
    x = torch.randn(3, h).to(dtype)
    assert_close(tm.triton_experts(q, x, idx, w), reference_experts(deq, x, idx, w), dtype)


def test_quantized_layouts_match_quantization_codecs(tm):
    """The kernels read the checkpoints written by dsv41.quantization (int8 packed e2m1 + e8m0 scales;
    float8 weights + ue8m0 block scales)."""
    codecs = pytest.importorskip("dsv41.quantization.codecs")
    dense = make_experts(3, 64, 32, limit=2.0)
    idx, w = routing(2, 3, 2)
    x = torch.randn(2, 64)
    for fmt in ("mxfp4", "fp8"):
        if fmt == "mxfp4":
            gq, gs = codecs.quantize_mxfp4(dense.gate_up_proj)
            dq, ds = codecs.quantize_mxfp4(dense.down_proj)
            gu, dn = codecs.dequantize_mxfp4(gq, gs), codecs.dequantize_mxfp4(dq, ds)
            torch.testing.assert_close(ref.dequantize_mxfp4(gq, gs), gu, atol=0, rtol=0)
        else:
            gq, gs = codecs.quantize_fp8_block(dense.gate_up_proj, scale_fmt="ue8m0")
            dq, ds = codecs.quantize_fp8_block(dense.down_proj, scale_fmt="ue8m0")
            gu, dn = codecs.dequantize_fp8_block(gq, gs), codecs.dequantize_fp8_block(dq, ds)
        q = ref.QuantizedExperts(fmt, gq, gs, dq, ds, 2.0, 64, 32)
        want = reference_experts(SimpleNamespace(gate_up_proj=gu, down_proj=dn, limit=2.0), x, idx, w)
        torch.testing.assert_close(tm.triton_experts(q, x, idx, w), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt,h,i", [("fp8", 160, 160), ("fp8", 64, 32), ("mxfp4", 96, 64)])
def test_triton_reads_loader_layout(tm, fmt, h, i):
    """The loader's kept-quantized experts (dsv41.quantization.experts: w1 / w3 filled separately,
    FP8 up rows padded to whole 128-row scale blocks) == the reference on the dequantized weights."""
    from dsv41.quantization import codecs
    from dsv41.quantization.experts import DeepseekV4QuantizedExperts

    dense = make_experts(4, h, i, limit=1.5)
    q = DeepseekV4QuantizedExperts(fmt, 4, h, i, 1.5)
    for e in range(4):
        for proj, w in (("w1", dense.gate_up_proj[e, :i]), ("w3", dense.gate_up_proj[e, i:]), ("w2", dense.down_proj[e])):
            codes, scale = codecs.quantize_fp8_block(w) if fmt == "fp8" else codecs.quantize_mxfp4(w)
            q.set_expert(e, proj, codes, scale, f"experts.{e}.{proj}.weight")
    assert q.up_offset == (256 if (fmt, i) == ("fp8", 160) else 128 if fmt == "fp8" else i)
    gu, dn = q.dequantized()
    assert rel_err(gu, dense.gate_up_proj) < (0.05 if fmt == "fp8" else 0.2)
    idx, w = routing(5, 4, 2)
    x = torch.randn(5, h)
    want = reference_experts(SimpleNamespace(gate_up_proj=gu, down_proj=dn, limit=1.5), x, idx, w)
    torch.testing.assert_close(tm.triton_experts(q, x, idx, w), want, atol=1e-5, rtol=0)


def test_triton_model_with_kept_quantized_experts(tm, tmp_path):
    """A quantized checkpoint loaded with moe_backend='triton': the experts stay FP8 / FP4 and the
    kernels dequantize them inside the GEMMs; logits == the fully dequantized model."""
    from dsv41.modeling import DeepseekV4Config, DeepseekV4ForCausalLM
    from dsv41.quantization import QuantSpec, load_quantized_model, quantize_checkpoint
    from dsv41.quantization.experts import DeepseekV4QuantizedExperts

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from modeling_utils import tiny_config_kwargs

    cfg = DeepseekV4Config(**tiny_config_kwargs(vocab_size=256, hidden_size=64, moe_intermediate_size=32, head_dim=32,
                                                q_lora_rank=64, o_lora_rank=32, num_attention_heads=2,
                                                index_n_heads=32, index_head_dim=32))
    torch.manual_seed(0)
    DeepseekV4ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    for label, spec in (("fp8", QuantSpec("fp8", partial_blocks=True)),
                        ("fp4", QuantSpec("fp8", partial_blocks=True, expert_dtype="fp4"))):
        quantize_checkpoint(tmp_path / "bf16", tmp_path / label, spec)
        dense = load_quantized_model(DeepseekV4ForCausalLM, tmp_path / label, dtype=torch.float32,
                                     quantized_experts="dequantize")
        kept = DeepseekV4ForCausalLM.from_pretrained(tmp_path / label, dtype=torch.float32, moe_backend="triton")
        experts = kept.model.layers[1].mlp.experts
        assert isinstance(experts, DeepseekV4QuantizedExperts) and experts.backend == "triton"
        with torch.no_grad():
            got, want = kept(ids, use_cache=False).logits, dense(ids, use_cache=False).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_triton_experts_fall_back_under_autograd(tm):
    ex = make_experts(4, 32, 16)
    ex.gate_up_proj.requires_grad_(True)
    idx, w = routing(3, 4, 2)
    x = torch.randn(3, 32, requires_grad=True)
    tm.triton_experts(ex, x, idx, w).sum().backward()
    assert x.grad is not None and ex.gate_up_proj.grad is not None


def test_triton_kernels_reject_cpu_tensors_without_interpreter(tm, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        tm.route_triton(torch.randn(2, 4), 2)


# ---------------------------------------------------------------------------- CPU fast path


@pytest.mark.parametrize("gemm", ["auto", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES) + ["prefill"])
def test_cpu_grouped_matches_reference(case, dtype, gemm):
    c = CASES.get(case, dict(t=40, e=8, h=64, i=32, k=3))  # 120 slots: the sort-based path
    ex = make_experts(c["e"], c["h"], c["i"], dtype)
    idx, w = routing(c["t"], c["e"], c["k"])
    if c["t"] > 3:
        idx[0, 0], idx[3, -1] = c["e"], -1
    x = torch.randn(c["t"], c["h"]).to(dtype)
    assert_close(cpu_grouped_experts(ex, x, idx, w, gemm=gemm), reference_experts(ex, x, idx, w), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_grouped_reuses_scratch_safely(dtype):
    """Large prefill (intermediates above 1 MiB: the reused per-thread scratch, >= 64 rows per
    expert: the mm loop): consecutive calls of different sizes stay exact, and a returned result
    never aliases the scratch."""
    from dsv41.modeling import moe_deepseek_v4 as moe

    moe.release_scratch()
    ex = make_experts(8, 512, 256, dtype)
    results = []
    for t, seed in ((700, 1), (300, 2), (900, 3)):
        idx, w = routing(t, 8, 2, seed=seed)
        x = torch.randn(t, 512).to(dtype)
        got = cpu_grouped_experts(ex, x, idx, w)
        assert_close(got, reference_experts(ex, x, idx, w), dtype)
        results.append((got, got.clone()))
    assert set(moe._SCRATCH.buffers) == {"xs", "h", "y"}
    assert all(torch.equal(a, b) for a, b in results)  # later calls did not overwrite earlier results
    moe.release_scratch()


@pytest.fixture
def fused_decode(monkeypatch):
    """The compiled one-token path for any expert size (it normally starts at 4 MiB of hit weights)."""
    from dsv41.modeling import moe_deepseek_v4 as moe

    monkeypatch.setattr(moe, "FUSED_DECODE_MIN_BYTES", 0)
    monkeypatch.setattr(moe, "_FUSED_DECODE", {})
    monkeypatch.setattr(moe, "NATIVE_EXPERTS", [])  # these tests cover the compiled PyTorch path
    return moe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("e,h,i,k", [(5, 97, 33, 1), (16, 64, 32, 8)])
def test_cpu_fused_decode_matches_reference(fused_decode, e, h, i, k, dtype):
    """One token through the Inductor-compiled gather-and-reduce: odd sizes, top-1 and top-8, a
    dropped slot (id == E) and a negative id are ignored."""
    ex = make_experts(e, h, i, dtype, limit=0.7)
    for seed in (1, 2):
        idx, w = routing(1, e, k, seed=seed)
        if seed == 2 and k > 1:
            idx[0, 0], idx[0, -1] = e, -1
        x = torch.randn(1, h).to(dtype)
        with torch.no_grad():
            got = cpu_grouped_experts(ex, x, idx, w.to(dtype))
        assert_close(got, reference_experts(ex, x, idx, w.to(dtype)), dtype)
    assert "fn" in fused_decode._FUSED_DECODE and "failed" not in fused_decode._FUSED_DECODE


def test_cpu_fused_decode_falls_back_when_compile_fails(fused_decode):
    """No C++ compiler (or any compile error): one warning, then the mm loop, same result."""
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    fused_decode._FUSED_DECODE["fn"] = broken
    ex = make_experts(4, 32, 16)
    idx, w = routing(1, 4, 2)
    x = torch.randn(1, 32)
    with pytest.warns(UserWarning, match="compiled CPU decode unavailable"):
        got = cpu_grouped_experts(ex, x, idx, w)
    assert_close(got, reference_experts(ex, x, idx, w), torch.float32)
    assert "no C++ compiler" in fused_decode._FUSED_DECODE["failed"]
    assert_close(cpu_grouped_experts(ex, x, idx, w), reference_experts(ex, x, idx, w), torch.float32)


def _native():
    from dsv41.kernels import cpu_ext

    ok, why = cpu_ext.cpu_native_supported()
    if not ok:
        pytest.skip(f"native CPU experts kernel: {why}")
    return cpu_ext


def _bf16_modes(cpu_ext, dtype):
    """bf16 weights: VDPBF16PS (when this CPU has it) and the widening path; fp32: the one path."""
    if dtype != torch.bfloat16:
        return [-1]
    return [0, 1] if cpu_ext.load_cpu_extension().has_avx512_bf16() else [0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("e,h,i,k,t", [
    (5, 97, 33, 1, 1),      # one token, top-1, odd sizes (vector tails everywhere)
    (16, 64, 32, 8, 1),     # top-8
    (6, 1000, 200, 6, 1),   # decode-sized rows, tails of 1000 % 32 and 200 % 32
    (16, 64, 32, 8, 5),     # few tokens, most experts idle
    (9, 130, 70, 3, 37),    # several rows per expert, odd sizes
    (8, 256, 64, 6, 45),    # > 8 rows per expert: several register tiles per expert
])
def test_cpu_native_matches_reference(e, h, i, k, t, dtype):
    """The AVX-512 C++ experts kernel (built on first use) equals the reference: odd sizes, top-1 /
    top-8, experts with no token, a dropped (id == E) and a negative id, all ids of a token dropped."""
    cpu_ext = _native()
    ex = make_experts(e, h, i, dtype, limit=0.7)
    for mode in _bf16_modes(cpu_ext, dtype):
        for seed in (1, 2):
            idx, w = routing(t, e, k, seed=seed)
            if seed == 2 and k > 1:
                idx[0, 0], idx[-1, -1] = e, -1
                if t > 2:
                    idx[1, :] = e  # a token whose every slot is dropped gets zeros
            x = torch.randn(t, h).to(dtype)
            got = cpu_ext.native_experts(ex.gate_up_proj, ex.down_proj, x, idx, w.to(dtype), 0.7, mode)
            want = reference_experts(ex, x, idx, w.to(dtype))
            assert_close(got, want, dtype)
            if seed == 2 and t > 2 and k > 1:
                assert not got[1].any()
    dropped = torch.full((t, k), e)
    got = cpu_ext.native_experts(ex.gate_up_proj, ex.down_proj, x, dropped, w.to(dtype), 0.7)
    assert got.dtype == dtype and got.shape == (t, h) and not got.any()


def test_cpu_native_reuses_buffers_safely():
    """Scratch buffers persist between calls: a large call, then a small one, then the large one
    again give the same results as fresh calls; results do not alias each other."""
    cpu_ext = _native()
    ex = make_experts(8, 96, 40)
    big, small = routing(60, 8, 4, seed=3), routing(1, 8, 2, seed=4)
    xb, xs = torch.randn(60, 96), torch.randn(1, 96)
    first = cpu_ext.native_experts(ex.gate_up_proj, ex.down_proj, xb, *big, 1.0)
    one = cpu_ext.native_experts(ex.gate_up_proj, ex.down_proj, xs, *small, 1.0)
    again = cpu_ext.native_experts(ex.gate_up_proj, ex.down_proj, xb, *big, 1.0)
    assert torch.equal(first, again)
    assert_close(one, reference_experts(ex, xs, *small), torch.float32)
    assert_close(first, reference_experts(ex, xb, *big), torch.float32)


def test_cpu_native_rejects_bad_shapes():
    """Mismatched shapes fail with a message naming both shapes, instead of reading out of bounds;
    weights the kernel does not handle (fp16, non-contiguous, mixed dtypes) give None (another path
    runs) and non-contiguous activations are handled."""
    cpu_ext = _native()
    ex = make_experts(4, 32, 16)
    idx, w = routing(2, 4, 2)
    x = torch.randn(2, 32)
    assert cpu_ext.native_experts(ex.gate_up_proj.half(), ex.down_proj.half(), x, idx, w, 1.0) is None
    assert cpu_ext.native_experts(ex.gate_up_proj, ex.down_proj.bfloat16(), x, idx, w, 1.0) is None
    strided = ex.gate_up_proj.transpose(1, 2).contiguous().transpose(1, 2)
    assert cpu_ext.native_experts(strided, ex.down_proj, x, idx, w, 1.0) is None
    x_t = torch.randn(32, 2).t()  # a transposed view
    assert_close(cpu_ext.native_experts(ex.gate_up_proj, ex.down_proj, x_t, idx, w, 1.0),
                 reference_experts(ex, x_t, idx, w), torch.float32)
    with pytest.raises(RuntimeError, match=r"x must be \[T, 32\], got \[2, 31\]"):
        cpu_ext.native_experts(ex.gate_up_proj, ex.down_proj, torch.randn(2, 31), idx, w, 1.0)
    with pytest.raises(RuntimeError, match="top_k_index and top_k_weights"):
        cpu_ext.native_experts(ex.gate_up_proj, ex.down_proj, torch.randn(3, 32), idx, w, 1.0)
    with pytest.raises(RuntimeError, match="expert shapes do not match"):
        cpu_ext.native_experts(ex.gate_up_proj, ex.down_proj[:, :, :8].contiguous(), torch.randn(2, 32), idx, w, 1.0)


def test_cpu_native_is_what_cpu_grouped_runs(monkeypatch):
    """cpu_grouped sends few rows per expert with large experts to the native kernel (registered on
    import): one token and small batches; not many rows per expert, not small experts."""
    cpu_ext = _native()
    from dsv41.modeling import moe_deepseek_v4 as moe

    assert cpu_ext.native_experts in moe.NATIVE_EXPERTS
    calls = []
    monkeypatch.setattr(moe, "NATIVE_EXPERTS", [lambda *a: calls.append(a[2].shape[0]) or cpu_ext.native_experts(*a)])
    ex = make_experts(8, 256, 128, torch.bfloat16)
    monkeypatch.setattr(moe, "NATIVE_MIN_BYTES", 10 * 2**20)  # 6 experts x 192 KiB: below
    idx, w = routing(1, 8, 6)
    x = torch.randn(1, 256).to(torch.bfloat16)
    assert_close(cpu_grouped_experts(ex, x, idx, w), reference_experts(ex, x, idx, w), torch.bfloat16)
    assert calls == []
    monkeypatch.setattr(moe, "NATIVE_MIN_BYTES", 2**20)
    monkeypatch.setattr(moe, "NATIVE_MAX_ROWS_PER_EXPERT", 4)
    threads = torch.get_num_threads()
    try:
        for n_threads, limit in ((2, 4), (1, 2)):  # one thread: half the rows per expert
            torch.set_num_threads(n_threads)
            calls.clear()
            for t in (1, 2, 3, 5, 6):  # 6 ... 36 slots over 8 experts
                idx, w = routing(t, 8, 6, seed=t)
                x = torch.randn(t, 256).to(torch.bfloat16)
                with torch.no_grad():
                    assert_close(cpu_grouped_experts(ex, x, idx, w), reference_experts(ex, x, idx, w), torch.bfloat16)
            assert calls == [t for t in (1, 2, 3, 5, 6) if 6 * t <= limit * 8]
    finally:
        torch.set_num_threads(threads)


def test_cpu_native_finds_pip_ninja(monkeypatch, tmp_path):
    """Without an activated venv, the pip ``ninja`` wheel's binary is put on PATH for the JIT build;
    with no ninja at all the kernel is reported unsupported (and the compiled path is used)."""
    from dsv41.kernels import cpu_ext

    fake = tmp_path / "ninja"
    fake.write_text("#!/bin/sh\necho 1.13.0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setitem(sys.modules, "ninja", SimpleNamespace(BIN_DIR=str(tmp_path)))
    assert cpu_ext._ninja_on_path() and os.environ["PATH"].split(os.pathsep)[0] == str(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setitem(sys.modules, "ninja", None)  # not installed
    assert not cpu_ext._ninja_on_path()
    monkeypatch.setenv("DSV41_CPU_NATIVE", "1")
    ok, why = cpu_ext.cpu_native_supported()
    assert not ok and ("ninja" in why or "AVX-512" in why or "x86-64" in why or "compiler" in why)


def test_cpu_grouped_gradients_match_reference():
    ex = make_experts(5, 24, 16)
    idx, w = routing(6, 5, 2)
    grads = []
    for fn in (cpu_grouped_experts, reference_experts):
        gu = ex.gate_up_proj.clone().requires_grad_(True)
        x = torch.randn(6, 24, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        e = SimpleNamespace(gate_up_proj=gu, down_proj=ex.down_proj, limit=ex.limit)
        fn(e, x, idx, w).square().sum().backward()
        grads.append((x.grad, gu.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-5)


def test_cpu_grouped_empty_and_all_dropped():
    ex = make_experts(4, 16, 8)
    x = torch.randn(3, 16)
    assert cpu_grouped_experts(ex, x[:0], torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2)).shape == (0, 16)
    idx = torch.full((3, 2), 4)
    assert torch.equal(cpu_grouped_experts(ex, x, idx, torch.ones(3, 2)), torch.zeros(3, 16))
    big = torch.full((40, 2), -1)
    assert torch.equal(cpu_grouped_experts(ex, torch.randn(40, 16), big, torch.ones(40, 2)), torch.zeros(40, 16))


# ----------------------------------------------------------------------------- registration


def test_backends_registered_under_interpreter(tm):
    from transformers.integrations.moe import ExpertsInterface

    from dsv41.modeling.moe_deepseek_v4 import MOE_BACKENDS, resolve_backend

    assert "triton" in MOE_BACKENDS and resolve_backend("triton", torch.device("cpu")) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) == "cpu_grouped"
    mapping = ExpertsInterface._global_mapping
    for name in ("dsv41_triton", "dsv41_cpu_grouped", "dsv41_reference"):
        assert name in mapping


def test_import_on_cpu_registers_only_runnable_backends():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import dsv41.kernels as k\n"
        "from dsv41.modeling.moe_deepseek_v4 import MOE_BACKENDS, resolve_backend\n"
        "import torch\n"
        "assert 'triton' not in MOE_BACKENDS and 'cuda' not in MOE_BACKENDS, MOE_BACKENDS\n"
        "st = k.backend_status()\n"
        "assert 'CUDA' in st['triton'] and 'CUDA' in st['cuda'], st\n"
        "try:\n"
        "    resolve_backend('triton', torch.device('cpu'))\n"
        "except ValueError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('triton resolved on a CPU machine')\n"
    )
    if torch.cuda.is_available():
        pytest.skip("this check describes a machine without CUDA")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def _tiny_transformers_model(tmp_path):
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from modeling_utils import randomize_, tiny_config_kwargs

    cfg = transformers.DeepseekV4Config(**tiny_config_kwargs(num_experts_per_tok=3, n_routed_experts=8))
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(cfg)
    randomize_(model, seed=1)
    model.save_pretrained(tmp_path)
    return cfg


def test_transformers_model_with_registered_experts(tmp_path, tm, monkeypatch):
    """Stock transformers DeepseekV4ForCausalLM (random weights, hash + routed MoE layers): the same
    logits with experts_implementation = dsv41_triton / dsv41_cpu_grouped as with eager."""
    import transformers

    cfg = _tiny_transformers_model(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    calls = []
    real_align = tm.align_triton
    monkeypatch.setattr(tm, "align_triton", lambda *a, **kw: calls.append(1) or real_align(*a, **kw))
    logits = {}
    for impl in ("eager", "dsv41_cpu_grouped", "dsv41_triton"):
        model = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path, experts_implementation=impl).eval()
        assert model.config._experts_implementation == impl
        with torch.no_grad():
            logits[impl] = model(ids).logits
    assert len(calls) == cfg.num_hidden_layers  # the Triton path really ran, once per MoE layer
    torch.testing.assert_close(logits["dsv41_cpu_grouped"], logits["eager"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits["dsv41_triton"], logits["eager"], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------- CUDA C++


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    return nvcc


def test_cuda_kernels_compile(tmp_path):
    """Compile-only build of every kernel template in moe_kernels.cuh (no torch headers needed)."""
    nvcc = _nvcc()
    res = subprocess.run(
        [nvcc, "-c", "-std=c++17", "-arch=sm_90", "-Werror", "all-warnings", "-I", str(CSRC),
         str(CSRC / "standalone_check.cu"), "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True, timeout=170,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 0


def test_cuda_compile_check_catches_errors(tmp_path):
    """The compile check is not vacuous: a syntax error in the kernel header fails it."""
    nvcc = _nvcc()
    broken = tmp_path / "moe_kernels.cuh"
    broken.write_text((CSRC / "moe_kernels.cuh").read_text().replace("hist[e] = 0;", "hist[e] = 0", 1))
    shutil.copy(CSRC / "standalone_check.cu", tmp_path / "standalone_check.cu")
    res = subprocess.run([nvcc, "-c", "-std=c++17", "-arch=sm_90", str(tmp_path / "standalone_check.cu"),
                          "-o", str(tmp_path / "k.o")], capture_output=True, text=True, timeout=170)
    assert res.returncode != 0
