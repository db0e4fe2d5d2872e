"""Tensor-level codecs of every weight format the kit reads or writes.

All functions work on a 2-D matrix ``[rows, cols]`` (``cols`` = input features, the reduction
dimension ``K``) or on a stack ``[..., rows, cols]``; quantization is independent per row group
so callers may process any contiguous range of rows (a multiple of the row block) at a time.

Formats
-------
* FP8 block (DeepSeek V3/V4): ``float8_e4m3fn`` values, one scale per ``bm x bn`` block.
  ``scale_fmt="float"``: float32 ``weight_scale_inv`` = amax/448 (V3);
  ``scale_fmt="ue8m0"``: power-of-two scale 2**ceil(log2(amax/448)) stored as ``float8_e8m0fnu`` (V4).
  Dequantized weight = fp8 value * scale. Shapes: scale ``[ceil(rows/bm), ceil(cols/bn)]``.
* FP4 e2m1 (DeepSeek-V4 experts / OCP MX): values {0, .5, 1, 1.5, 2, 3, 4, 6} with a sign bit;
  two codes per byte, **low nibble = even element**, stored as ``int8`` ``[rows, cols/2]``;
  one ue8m0 scale per 32 consecutive input values, ``[rows, cols/32]``.
* gpt-oss MXFP4: ``*_blocks`` uint8 ``[..., G, 16]`` + ``*_scales`` uint8 biased exponents
  ``[..., G]``; value = e2m1(nibble) * 2**(scale-127) (read only).
* Weight-only integers (ours): symmetric, one float16 scale per ``group_size`` input values.
  int8 codes in [-127, 127] stored as ``int8 [rows, cols]``; int4 codes in [-8, 7] (RTN uses
  [-7, 7]) stored two per byte as ``uint8 [rows, cols/2]`` (low nibble = even element, two's
  complement nibbles). Scale = amax/qmax, floored at 2**-14 (smallest normal float16).
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
UE8M0_DTYPE = torch.float8_e8m0fnu
UE8M0_BIAS = 127
FP4_MAX = 6.0
MX_GROUP = 32
INT_SCALE_DTYPE = torch.float16
INT_SCALE_MIN = 2.0**-14
# Smallest amax used to derive a scale: keeps scales finite and normal for all-zero or subnormal blocks.
_AMAX_FLOOR = 2.0**-100

#: e2m1 code (0..15) -> value. Bit 3 is the sign, bits 2..1 the exponent, bit 0 the mantissa.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class QuantizationError(ValueError):
    """Bad input for a quantization or dequantization step; the message names the tensor."""


def _label(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


def check_finite(x: torch.Tensor, name: str | None = None, row_offset: int = 0) -> None:
    """Raise if ``x`` holds NaN or Inf, naming the tensor and the first bad position."""
    if not x.dtype.is_floating_point:
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = float(x[pos])
        idx = (pos[0] + row_offset,) + pos[1:] if pos else pos
        raise QuantizationError(
            f"{_label(name)}: expected finite values, found {value} at index {list(idx)} "
            f"({int(bad.sum())} non-finite element(s) in the rows read)"
        )


# ----------------------------------------------------------------------------- ue8m0 scales


def ceil_pow2_exponent(x: torch.Tensor) -> torch.Tensor:
    """Exact integer ``ceil(log2(x))`` for positive finite float32 ``x`` (no rounding of log2)."""
    mant, exp = torch.frexp(x.to(torch.float32))  # x = mant * 2**exp, mant in [0.5, 1)
    return torch.where(mant == 0.5, exp - 1, exp).to(torch.int32)


def ue8m0_encode_exponent(exponent: torch.Tensor) -> torch.Tensor:
    """Integer exponents in [-127, 127] -> ``float8_e8m0fnu`` tensor holding 2**exponent."""
    if exponent.numel() and (int(exponent.min()) < -UE8M0_BIAS or int(exponent.max()) > 127):
        raise QuantizationError(
            f"ue8m0 exponent out of range: expected [-127, 127], found [{int(exponent.min())}, {int(exponent.max())}]"
        )
    return (exponent.to(torch.int32) + UE8M0_BIAS).to(torch.uint8).view(UE8M0_DTYPE)


def ue8m0_from_value(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``x`` (positive), as ue8m0."""
    return ue8m0_encode_exponent(ceil_pow2_exponent(x).clamp(-UE8M0_BIAS, 127))


def ue8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """ue8m0 (``float8_e8m0fnu`` or its raw ``uint8`` bytes) -> float32 2**(byte-127); 0xFF -> NaN."""
    if s.dtype == UE8M0_DTYPE:
        s = s.view(torch.uint8)
    if s.dtype != torch.uint8:
        raise QuantizationError(f"ue8m0 scales must be float8_e8m0fnu or uint8, found {s.dtype}")
    out = torch.ldexp(torch.ones(s.shape, dtype=torch.float32), s.to(torch.int32) - UE8M0_BIAS)
    return torch.where(s == 0xFF, torch.full_like(out, float("nan")), out)


def scale_to_float(s: torch.Tensor) -> torch.Tensor:
    """Any stored scale (fp32/bf16/fp16, ue8m0 or its uint8 bytes) -> float32."""
    if s.dtype in (UE8M0_DTYPE, torch.uint8):
        return ue8m0_to_float(s)
    return s.to(torch.float32)


# ----------------------------------------------------------------------------- FP8 blocks


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def _block_view(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``[..., R, C]`` to whole blocks and view as ``[..., R/bm, bm, C/bn, bn]``."""
    *lead, rows, cols = x.shape
    bm, bn = block
    pr, pc = (-rows) % bm, (-cols) % bn
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x.reshape(*lead, (rows + pr) // bm, bm, (cols + pc) // bn, bn), (rows, cols)


def quantize_fp8_block(
    w: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    scale_fmt: str = "ue8m0",
    name: str | None = None,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., R, C]`` -> (``float8_e4m3fn [..., R, C]``, scale ``[..., ceil(R/bm), ceil(C/bn)]``).

    Edge blocks may be partial (the DeepSeek layout uses ceil); callers that need whole blocks
    check divisibility first. The scale is the multiplier applied on dequantization."""
    if scale_fmt not in ("float", "ue8m0"):
        raise QuantizationError(f"{_label(name)}: scale_fmt expected 'float' or 'ue8m0', found {scale_fmt!r}")
    check_finite(w, name, row_offset)
    xb, (rows, cols) = _block_view(w.to(torch.float32), block)
    amax = xb.abs().amax(dim=(-3, -1)).clamp_min(_AMAX_FLOOR)
    if scale_fmt == "ue8m0":
        scale = ue8m0_from_value(amax / FP8_MAX)
        s = ue8m0_to_float(scale)
    else:
        scale = amax / FP8_MAX
        s = scale
    sb = s[..., :, None, :, None]
    q = (xb / sb).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    # Near float32's max a value may round up to a grid point beyond it (e.g. bf16 max -> 2**128):
    # step those codes one e4m3 ulp towards zero (bit patterns are monotone in magnitude).
    over = torch.isinf(q.to(torch.float32) * sb)
    if bool(over.any()):
        bits = q.view(torch.uint8)
        q = torch.where(over, bits - 1, bits).view(FP8_DTYPE)
    q = q.reshape(*q.shape[:-4], q.shape[-4] * q.shape[-3], q.shape[-2] * q.shape[-1])[..., :rows, :cols]
    return q.contiguous(), scale.contiguous()


def dequantize_fp8_block(
    q: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_block`. Without ``block`` the block size is derived from the
    scale grid (ceil layout: ``scale.shape[-2:] == (ceil(R/bm), ceil(C/bn))``)."""
    if q.dtype not in (FP8_DTYPE, torch.float8_e5m2):
        raise QuantizationError(f"{_label(name)}: expected a float8 weight, found {q.dtype}")
    *lead, rows, cols = q.shape
    if scale.dim() < 2 or tuple(scale.shape[:-2]) != tuple(lead):
        raise QuantizationError(
            f"{_label(name)}: scale shape expected [{', '.join(map(str, lead))}{', ' if lead else ''}R', C'], "
            f"found {list(scale.shape)}"
        )
    sr, sc = scale.shape[-2:]
    bm = _infer_block(rows, sr, block[0] if block else None)
    bn = _infer_block(cols, sc, block[1] if block else None)
    if bm is None or bn is None:
        raise QuantizationError(
            f"{_label(name)}: scale grid {list(scale.shape[-2:])} does not tile weight [{rows}, {cols}] "
            f"(expected [ceil({rows}/bm), ceil({cols}/bn)] for some block size)"
        )
    s = scale_to_float(scale)
    xb, _ = _block_view(q.to(torch.float32), (bm, bn))
    out = xb * s[..., :, None, :, None]
    out = out.reshape(*out.shape[:-4], out.shape[-4] * bm, out.shape[-2] * bn)[..., :rows, :cols]
    return out.to(dtype).contiguous()


def _infer_block(n: int, n_blocks: int, prefer: int | None = None) -> int | None:
    """Block size b with ceil(n/b) == n_blocks: ``prefer`` (e.g. the config's weight_block_size)
    when it fits, else the powers of two DeepSeek uses."""
    if n_blocks < 1:
        return None
    if prefer and math.ceil(n / prefer) == n_blocks:
        return prefer
    if n_blocks == 1:
        return max(n, 1)
    for b in (128, 32, 64, 256, 16, 512, 8, 1024, 4, 2, 1):
        if math.ceil(n / b) == n_blocks:
            return b
    return None


# ----------------------------------------------------------------------------- e2m1 / MXFP4

# Rounding thresholds between consecutive e2m1 magnitudes; at an exact tie the code with an
# even mantissa bit wins (IEEE round-half-to-even): (threshold, tie goes up?)
_E2M1_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round float values (already scaled into [-6, 6]; larger magnitudes saturate) to e2m1 codes
    0..15 (uint8), round-half-to-even. -0.0 keeps its sign bit."""
    a = x.abs().to(torch.float32)
    code = torch.zeros(x.shape, dtype=torch.uint8)
    for t, up in _E2M1_THRESHOLDS:
        code += (a >= t if up else a > t).to(torch.uint8)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return lut[code.to(torch.long)]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 codes [..., 2n]`` (values 0..15) -> ``uint8 [..., n]``; low nibble = even element."""
    if codes.shape[-1] % 2:
        raise QuantizationError(f"nibble packing needs an even last dimension, found {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0x0F) | ((c[..., 1::2] & 0x0F) << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` bytes (int8 or uint8) -> ``uint8 codes [..., 2n]``; inverse of :func:`pack_nibbles`."""
    u = packed.contiguous().view(torch.uint8)
    return torch.stack((u & 0x0F, u >> 4), dim=-1).reshape(*u.shape[:-1], 2 * u.shape[-1])


def quantize_mxfp4(w: torch.Tensor, name: str | None = None, row_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., R, C]`` -> (``int8 [..., R, C/2]`` packed e2m1, ``float8_e8m0fnu [..., R, C/32]``).

    Scale = 2**ceil(log2(amax/6)) per 32 input values, so no value is clipped."""
    cols = w.shape[-1]
    if cols % MX_GROUP:
        raise QuantizationError(
            f"{_label(name)}: FP4 needs the input dimension to be a multiple of {MX_GROUP}, found shape {list(w.shape)}"
        )
    check_finite(w, name, row_offset)
    g = w.to(torch.float32).reshape(*w.shape[:-1], cols // MX_GROUP, MX_GROUP)
    scale = ue8m0_from_value(g.abs().amax(dim=-1).clamp_min(_AMAX_FLOOR) / FP4_MAX)
    sf = ue8m0_to_float(scale)[..., None]
    codes = e2m1_encode(g / sf)
    over = torch.isinf(e2m1_decode(codes) * sf)  # rounded past float32 max: one step towards zero
    if bool(over.any()):
        codes = torch.where(over, codes - 1, codes)
    codes = codes.reshape(w.shape)
    return pack_nibbles(codes).view(torch.int8), scale


def dequantize_mxfp4(
    packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, name: str | None = None
) -> torch.Tensor:
    """Inverse of :func:`quantize_mxfp4` (DeepSeek layout, scale per 32 along the input dim)."""
    *lead, rows, half = packed.shape
    expected = (*lead, rows, (2 * half) // MX_GROUP)
    if (2 * half) % MX_GROUP or tuple(scale.shape) != expected:
        raise QuantizationError(
            f"{_label(name)}: FP4 scale shape expected {list(expected)} for packed weight {list(packed.shape)}, "
            f"found {list(scale.shape)}"
        )
    vals = e2m1_decode(unpack_nibbles(packed))
    vals = vals.reshape(*lead, rows, expected[-1], MX_GROUP) * scale_to_float(scale)[..., None]
    return vals.reshape(*lead, rows, 2 * half).to(dtype)


def dequantize_gptoss_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32, name: str | None = None
) -> torch.Tensor:
    """gpt-oss ``*_blocks [..., G, 16]`` + ``*_scales [..., G]`` -> ``[..., G*32]`` (the stored
    row-major layout, before gpt-oss' own transpose)."""
    if blocks.dim() < 2 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise QuantizationError(
            f"{_label(name)}: gpt-oss MXFP4 expected blocks [..., G, 16] and scales [..., G], "
            f"found blocks {list(blocks.shape)} and scales {list(scales.shape)}"
        )
    vals = e2m1_decode(unpack_nibbles(blocks)) * scale_to_float(scales.view(torch.uint8))[..., None]
    return vals.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32).to(dtype)


def mxfp4_to_gptoss(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek FP4 layout -> gpt-oss ``(blocks, scales)`` (same nibble order, regrouped)."""
    u = packed.contiguous().view(torch.uint8)
    return u.reshape(*u.shape[:-1], u.shape[-1] // 16, 16), scale.contiguous().view(torch.uint8)


# ----------------------------------------------------------------------------- weight-only integers


def int_qrange(bits: int) -> tuple[int, int]:
    if bits == 8:
        return -127, 127
    if bits == 4:
        return -8, 7
    raise QuantizationError(f"integer weight-only quantization supports 4 or 8 bits, found {bits}")


def resolve_group_size(cols: int, group_size: int, name: str | None = None) -> int:
    """``group_size <= 0`` means one group per row; otherwise it must divide ``cols``."""
    if group_size <= 0:
        return cols
    if cols % group_size:
        raise QuantizationError(
            f"{_label(name)}: group size {group_size} does not divide the input dimension {cols} (shape [..., {cols}])"
        )
    return group_size


def int_scales(w_groups: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-group float16 scales amax/qmax (qmax = 127 or 7), floored at 2**-14."""
    qmax = 127.0 if bits == 8 else 7.0
    s = (w_groups.abs().amax(dim=-1) / qmax).clamp_min(INT_SCALE_MIN)
    s16 = s.to(INT_SCALE_DTYPE)
    if bool(torch.isinf(s16).any()):
        raise QuantizationError(f"weight magnitude exceeds the float16 scale range (max scale {float(s.max())})")
    return s16


def quantize_int(
    w: torch.Tensor, bits: int, group_size: int, name: str | None = None, row_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric group quantization. Returns (codes, float16 scales [..., R, C/g]);
    codes are ``int8 [..., R, C]`` for 8 bits and packed ``uint8 [..., R, C/2]`` for 4 bits."""
    lo, hi = int_qrange(bits)
    cols = w.shape[-1]
    g = resolve_group_size(cols, group_size, name)
    if bits == 4 and cols % 2:
        raise QuantizationError(f"{_label(name)}: int4 packing needs an even input dimension, found {cols}")
    check_finite(w, name, row_offset)
    wg = w.to(torch.float32).reshape(*w.shape[:-1], cols // g, g)
    scale = int_scales(wg, bits)
    q = torch.round(wg / scale.to(torch.float32)[..., None]).clamp(lo if bits == 8 else -7, hi).to(torch.int8)
    q = q.reshape(w.shape)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] -> uint8 [..., C/2], two's-complement nibbles, low nibble = even element."""
    return pack_nibbles((q.to(torch.int16) & 0x0F).to(torch.uint8))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    u = unpack_nibbles(packed).to(torch.int16)
    return torch.where(u >= 8, u - 16, u).to(torch.int8)


def dequantize_int(
    q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32, name: str | None = None
) -> torch.Tensor:
    codes = unpack_int4(q) if bits == 4 else q
    if bits == 8 and q.dtype != torch.int8:
        raise QuantizationError(f"{_label(name)}: int8 weight expected dtype int8, found {q.dtype}")
    *lead, rows, cols = codes.shape
    if scale.dim() != codes.dim() or tuple(scale.shape[:-1]) != (*lead, rows) or scale.shape[-1] < 1 or cols % scale.shape[-1]:
        raise QuantizationError(
            f"{_label(name)}: int{bits} scale shape expected [{', '.join(map(str, (*lead, rows)))}, C/g] with g "
            f"dividing {cols}, found {list(scale.shape)}"
        )
    ng = scale.shape[-1]
    out = codes.to(torch.float32).reshape(*lead, rows, ng, cols // ng) * scale.to(torch.float32)[..., None]
    return out.reshape(*lead, rows, cols).to(dtype)
