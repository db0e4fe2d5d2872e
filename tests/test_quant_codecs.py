"""Bit-exact packing tables and round-trip error bounds of every weight codec."""

from __future__ import annotations

import pytest
import torch

from dsv41.quantization import codecs as C
from dsv41.quantization.gptq import HessianAccumulator, gptq_quantize_grouped, gptq_quantize_weight


pytestmark = pytest.mark.usefixtures("one_thread")


def _edge_matrix(rows=64, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0] = 0.0  # an all-zero row (every block of it zero in row-local formats)
    w[1, :32] = 0.0
    w[2, 5] = 3.0e38  # near float32 max (bf16 max is 3.39e38)
    w[3, :] = 1.0e-40  # float32 subnormals
    w[4, 7] = -1.0e-45
    w[5, 0] = torch.finfo(torch.bfloat16).max
    return w


# ----------------------------------------------------------------------------- ue8m0


def test_ue8m0_table_bit_exact():
    # (byte, value) written out: value = 2**(byte-127); 0xFF is NaN
    table = [(0, 2.0**-127), (1, 2.0**-126), (100, 2.0**-27), (126, 0.5), (127, 1.0), (128, 2.0), (130, 8.0), (254, 2.0**127)]
    b = torch.tensor([t[0] for t in table], dtype=torch.uint8)
    got = C.ue8m0_to_float(b.view(torch.float8_e8m0fnu))
    assert got.tolist() == [t[1] for t in table]
    assert torch.isnan(C.ue8m0_to_float(torch.tensor([255], dtype=torch.uint8)))[0]
    # encoding: smallest power of two >= x, exact at powers of two
    xs = torch.tensor([1.0, 1.0000001, 0.75, 0.5, 3.0, 448.0, 2.0**-126, 2.0**-100 * 1.5, 2.0**126 * 1.5])
    enc = C.ue8m0_from_value(xs).view(torch.uint8).tolist()
    assert enc == [127, 128, 127, 126, 129, 136, 1, 28, 254]
    # torch's own e8m0 -> float conversion agrees with ours
    allb = torch.arange(0, 255, dtype=torch.uint8)
    assert torch.equal(allb.view(torch.float8_e8m0fnu).to(torch.float32), C.ue8m0_to_float(allb))


def test_ue8m0_exponent_out_of_range_rejected():
    with pytest.raises(C.QuantizationError, match=r"\[-127, 127\]"):
        C.ue8m0_encode_exponent(torch.tensor([128]))


# ----------------------------------------------------------------------------- e2m1 and nibbles


E2M1_TABLE = [
    # (value, code) for every representable value, then rounding cases (ties to even mantissa)
    (0.0, 0b0000), (0.5, 0b0001), (1.0, 0b0010), (1.5, 0b0011), (2.0, 0b0100), (3.0, 0b0101), (4.0, 0b0110), (6.0, 0b0111),
    (-0.0, 0b1000), (-0.5, 0b1001), (-1.0, 0b1010), (-1.5, 0b1011), (-2.0, 0b1100), (-3.0, 0b1101), (-4.0, 0b1110), (-6.0, 0b1111),
    (0.25, 0b0000), (0.26, 0b0001), (0.75, 0b0010), (1.25, 0b0010), (1.75, 0b0100), (2.5, 0b0100), (3.5, 0b0110),
    (5.0, 0b0110), (5.01, 0b0111), (7.0, 0b0111), (-0.75, 0b1010), (-5.0, 0b1110), (0.1, 0b0000),
]


def test_e2m1_encode_decode_table():
    vals = torch.tensor([v for v, _ in E2M1_TABLE])
    codes = C.e2m1_encode(vals)
    assert codes.tolist() == [c for _, c in E2M1_TABLE]
    dec = C.e2m1_decode(torch.arange(16))
    assert dec.tolist() == list(C.E2M1_VALUES)
    assert torch.signbit(dec[8]) and not torch.signbit(dec[0])


def test_nibble_packing_bit_exact():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x0, 0x7, 0x8]], dtype=torch.uint8)
    packed = C.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F, 0x87]]  # low nibble = even element
    assert torch.equal(C.unpack_nibbles(packed), codes)
    assert torch.equal(C.unpack_nibbles(packed.view(torch.int8)), codes)
    # int4 two's complement nibbles: -8 -> 0x8, -1 -> 0xF, 7 -> 0x7
    q = torch.tensor([[-8, 7, -1, 0, 3, -3]], dtype=torch.int8)
    p = C.pack_int4(q)
    assert p.tolist() == [[0x78, 0x0F, 0xD3]]
    assert torch.equal(C.unpack_int4(p), q)
    every = torch.arange(256, dtype=torch.uint8).view(1, 256)
    assert torch.equal(C.pack_nibbles(C.unpack_nibbles(every)), every)


# ----------------------------------------------------------------------------- FP8 blocks


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("block", [(128, 128), (32, 32)])
def test_fp8_roundtrip_bound(scale_fmt, block):
    w = _edge_matrix(rows=160, cols=256)
    q, s = C.quantize_fp8_block(w, block, scale_fmt, name="w")
    assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == tuple(w.shape)
    assert tuple(s.shape) == (-(-160 // block[0]), 256 // block[1])
    assert s.dtype == (torch.float8_e8m0fnu if scale_fmt == "ue8m0" else torch.float32)
    d = C.dequantize_fp8_block(q, s)
    sf = C.scale_to_float(s).repeat_interleave(block[0], 0)[:160].repeat_interleave(block[1], 1)
    # e4m3: half an ulp is 2**-4 relative for normals, 2**-10 * scale absolute for subnormals
    bound = 2.0**-4 * w.abs() + 2.0**-10 * sf
    assert bool(((d - w).abs() <= bound).all())
    assert bool((d[0] == 0).all()) and bool((d[1, :32] == 0).all())
    assert torch.isfinite(d).all()
    # ue8m0 scales are powers of two; float scales hit the block max exactly
    if scale_fmt == "ue8m0":
        m, _ = torch.frexp(C.scale_to_float(s))
        assert bool((m == 0.5).all())


def test_fp8_partial_blocks_and_3d():
    w = torch.randn(3, 100, 70)
    q, s = C.quantize_fp8_block(w, (32, 32), "ue8m0")
    assert tuple(s.shape) == (3, 4, 3)
    d = C.dequantize_fp8_block(q, s, block=(32, 32))
    assert ((d - w).abs() <= 2.0**-4 * w.abs() + 2.0**-10 * 4).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected_with_position(bad):
    w = torch.zeros(8, 64)
    w[5, 9] = bad
    for fn in (
        lambda: C.quantize_fp8_block(w, (8, 32), "ue8m0", name="layers.0.attn.wq_a.weight"),
        lambda: C.quantize_mxfp4(w, name="layers.0.attn.wq_a.weight"),
        lambda: C.quantize_int(w, 4, 32, name="layers.0.attn.wq_a.weight"),
    ):
        with pytest.raises(C.QuantizationError, match=r"'layers\.0\.attn\.wq_a\.weight'.*index \[5, 9\]"):
            fn()


# ----------------------------------------------------------------------------- FP4 experts / gpt-oss


def test_mxfp4_roundtrip_bound_and_layout():
    w = _edge_matrix(rows=16, cols=128)
    q, s = C.quantize_mxfp4(w, name="e")
    assert q.dtype == torch.int8 and tuple(q.shape) == (16, 64)
    assert s.dtype == torch.float8_e8m0fnu and tuple(s.shape) == (16, 4)
    d = C.dequantize_mxfp4(q, s)
    sf = C.scale_to_float(s).repeat_interleave(32, 1)
    # no clipping (scale = 2**ceil(log2(amax/6))): error <= half the spacing at the value's binade
    # of e2m1, i.e. <= 0.25*|x| + 0.25*scale (0.25*scale covers the [0, 0.5*scale] subnormal step)
    assert bool(((d - w).abs() <= 0.25 * w.abs() + 0.25 * sf).all())
    assert bool((d[0] == 0).all())
    # values exactly on the grid survive unchanged
    grid = torch.tensor(C.E2M1_VALUES).repeat(2).view(1, 32) * 4.0
    qg, sg = C.quantize_mxfp4(grid)
    assert torch.equal(C.dequantize_mxfp4(qg, sg), grid)
    assert C.ue8m0_to_float(sg).item() == 4.0


def test_mxfp4_group_must_divide():
    with pytest.raises(C.QuantizationError, match=r"'x'.*multiple of 32.*\[4, 48\]"):
        C.quantize_mxfp4(torch.ones(4, 48), name="x")


def test_gptoss_layout_reads_same_values():
    w = torch.randn(2, 8, 64)
    q, s = C.quantize_mxfp4(w)
    blocks, scales = C.mxfp4_to_gptoss(q, s)
    assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (2, 8, 2, 16) and tuple(scales.shape) == (2, 8, 2)
    assert torch.equal(C.dequantize_gptoss_mxfp4(blocks, scales), C.dequantize_mxfp4(q, s))
    # hand-made gpt-oss block: byte 0x21 -> [1.0, 0.5] (low nibble first) times 2**(128-127)
    b = torch.zeros(1, 1, 16, dtype=torch.uint8)
    b[0, 0, 0] = 0x21
    got = C.dequantize_gptoss_mxfp4(b, torch.tensor([[128]], dtype=torch.uint8))
    assert got[0, :2].tolist() == [1.0, 2.0] and bool((got[0, 2:] == 0).all())


# ----------------------------------------------------------------------------- weight-only int


@pytest.mark.parametrize("bits,group", [(8, 128), (8, 32), (4, 32), (4, 64), (4, -1)])
def test_int_roundtrip_bound(bits, group):
    w = _edge_matrix(rows=32, cols=128)
    w[5, 0] = 1.0e4  # float16 scale range
    w[2, 5] = -2.0e3
    q, s = C.quantize_int(w, bits, group, name="w")
    g = 128 if group <= 0 else group
    assert s.dtype == torch.float16 and tuple(s.shape) == (32, 128 // g)
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert tuple(q.shape) == ((32, 128) if bits == 8 else (32, 64))
    d = C.dequantize_int(q, s, bits)
    sf = s.to(torch.float32).repeat_interleave(g, 1)
    assert bool(((d - w).abs() <= 0.5 * sf * (1 + 1e-6)).all())
    assert bool((d[0] == 0).all())


def test_int_group_must_divide_and_scale_checks():
    with pytest.raises(C.QuantizationError, match=r"'k'.*group size 48 does not divide the input dimension 128"):
        C.quantize_int(torch.ones(2, 128), 4, 48, name="k")
    q, s = C.quantize_int(torch.ones(2, 128), 8, 32)
    with pytest.raises(C.QuantizationError, match=r"scale shape expected"):
        C.dequantize_int(q, s[:1], 8, name="k")


# ----------------------------------------------------------------------------- GPTQ on one linear


def test_gptq_beats_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    rows, cols, n = 48, 128, 2048
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 2 * mix)  # correlated features
    w = torch.randn(rows, cols, generator=g) * 0.05
    acc = HessianAccumulator(cols)
    for chunk in x.split(500):
        acc.add(chunk)
    assert acc.n == n
    assert torch.allclose(acc.H, 2.0 / n * x.T @ x, rtol=1e-4, atol=1e-4)
    codes, scales = gptq_quantize_weight(w, acc.H, bits=4, group_size=32)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    wg = (codes.float().view(rows, 4, 32) * scales.float()[..., None]).view(rows, cols)
    q, s = C.quantize_int(w, 4, 32)
    wr = C.dequantize_int(q, s, 4)
    err_gptq = ((x @ (w - wg).T) ** 2).mean()
    err_rtn = ((x @ (w - wr).T) ** 2).mean()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    # rows are independent: quantizing a row subset gives the same codes
    c2, s2 = gptq_quantize_weight(w[10:20], acc.H, bits=4, group_size=32)
    assert torch.equal(c2, codes[10:20]) and torch.equal(s2, scales[10:20])
    # grouped form: one Hessian per row block
    cg, sg = gptq_quantize_grouped(w, torch.stack([acc.H, acc.H]), bits=4, group_size=32)
    assert torch.equal(cg[:24], gptq_quantize_weight(w[:24], acc.H, 4, 32)[0])


def test_gptq_rejects_bad_hessian():
    with pytest.raises(C.QuantizationError, match=r"Hessian shape expected \[16, 16\]"):
        gptq_quantize_weight(torch.ones(4, 16), torch.eye(8), name="w")
