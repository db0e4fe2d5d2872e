"""Triton MoE kernels: routing, token alignment, grouped expert GEMMs (dense bf16/fp16/fp32, FP8
block-scaled and MXFP4 weights dequantized in the kernel) and the reduction back to token order.

Pipeline of :func:`triton_experts` for T tokens, top-k, E experts, hidden H, expert width I::

    align      top_k_index [T, k] -> per-expert row blocks of BLOCK_M rows (sorted slot ids,
               expert of each block, number of rows used, inverse permutation)
    gate_up    H_rows[r, :] = swiglu_clamped(x[token(r)] @ W_gate[e].T, x[token(r)] @ W_up[e].T)
               (two accumulators share the A tile; SwiGLU + clamp in the epilogue)
    down       Y[slot(r), :] = weight(slot(r)) * (H_rows[r] @ W_down[e].T)   (written in slot order)
    reduce     out[t] = sum_j Y[t*k + j]   (fp32 accumulation, invalid expert ids skipped)

Under ``TRITON_INTERPRET=1`` (CPU CI) every operand is upcast to float32 inside the kernel,
because the interpreter computes bfloat16 on raw bits.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .reference import Alignment, align_capacity

SCORING_IDS = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}
WFMT_IDS = {"dense": 0, "fp8": 1, "mxfp4": 2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_ok(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"Triton MoE kernels need CUDA tensors (got a tensor on {t.device}); on CPU set "
            "TRITON_INTERPRET=1 before importing triton, or use the cpu_grouped backend"
        )


# =========================================================================================
# routing


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, ids_ptr, tid2eid_ptr, w_out_ptr, i_out_ptr,
    T, E, stride_l, scaling,
    SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, HASH: tl.constexpr, RENORM: tl.constexpr,
    TOPK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, K_PAD)
    rmask = rows < T
    cmask = cols < E
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    if SCORING == 0:
        # sqrt(softplus(x)); softplus = max(x, 0) + log1p(exp(-|x|)), log1p by series for tiny args
        y = tl.exp(-tl.abs(x))
        lp = tl.where(y < 1e-4, y - 0.5 * y * y, tl.log(1.0 + y))
        s = tl.sqrt(tl.maximum(x, 0.0) + lp)
    elif SCORING == 1:
        s = 1.0 / (1.0 + tl.exp(-x))
    else:
        xm = tl.where(cmask[None, :], x, float("-inf"))
        m = tl.max(xm, axis=1)
        ex = tl.where(cmask[None, :], tl.exp(xm - m[:, None]), 0.0)
        s = ex / tl.sum(ex, axis=1)[:, None]
    s = tl.where(cmask[None, :], s, 0.0)
    wt = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    it = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int64)
    if HASH:
        tok = tl.load(ids_ptr + rows, mask=rmask, other=0).to(tl.int64)
        for j in tl.static_range(TOPK):
            e = tl.load(tid2eid_ptr + tok * TOPK + j, mask=rmask, other=0).to(tl.int64)
            w = tl.sum(tl.where(cols[None, :] == e[:, None], s, 0.0), axis=1)
            wt = tl.where(kcols[None, :] == j, w[:, None], wt)
            it = tl.where(kcols[None, :] == j, e[:, None], it)
    else:
        biased = s
        if HAS_BIAS:
            biased = s + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        biased = tl.where(cmask[None, :], biased, float("-inf"))
        for j in tl.static_range(TOPK):
            m = tl.max(biased, axis=1)
            e = tl.min(tl.where(biased == m[:, None], cols[None, :], BLOCK_E), axis=1)
            hit = cols[None, :] == e[:, None]
            w = tl.sum(tl.where(hit, s, 0.0), axis=1)
            biased = tl.where(hit, float("-inf"), biased)
            wt = tl.where(kcols[None, :] == j, w[:, None], wt)
            it = tl.where(kcols[None, :] == j, e.to(tl.int64)[:, None], it)
    if RENORM:
        wt = wt / (tl.sum(wt, axis=1)[:, None] + 1e-20)
    wt = wt * scaling
    omask = rmask[:, None] & (kcols[None, :] < TOPK)
    off = rows[:, None].to(tl.int64) * TOPK + kcols[None, :]
    tl.store(w_out_ptr + off, wt, mask=omask)
    tl.store(i_out_ptr + off, it, mask=omask)


def route_triton(
    logits: torch.Tensor,
    top_k: int,
    scoring_func: str = "sqrtsoftplus",
    bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    renormalize: bool = True,
    input_ids: torch.Tensor | None = None,
    tid2eid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused router epilogue; same contract as :func:`dsv41.kernels.reference.route_reference`
    (indices come out ordered by decreasing biased score; ties go to the lower expert id)."""
    _device_ok(logits)
    if scoring_func not in SCORING_IDS:
        raise ValueError(f"scoring_func must be one of {sorted(SCORING_IDS)}, got {scoring_func!r}")
    logits = logits.contiguous()
    t, e = logits.shape
    if tid2eid is None and not 1 <= top_k <= e:
        raise ValueError(f"top_k={top_k} must be in [1, {e}]")
    if tid2eid is not None:
        if input_ids is None:
            raise ValueError("hash routing needs input_ids together with tid2eid")
        if tid2eid.shape[1] != top_k:
            raise ValueError(f"tid2eid has {tid2eid.shape[1]} experts per token, top_k is {top_k}")
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    indices = torch.empty((t, top_k), dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, indices
    block_e = triton.next_power_of_2(e)
    block_t = max(1, min(16, 4096 // block_e))
    dummy = logits
    _route_kernel[(triton.cdiv(t, block_t),)](
        logits, bias if bias is not None else dummy,
        input_ids.reshape(-1).contiguous() if input_ids is not None else dummy,
        tid2eid.contiguous() if tid2eid is not None else dummy,
        weights, indices, t, e, logits.stride(0), float(routed_scaling_factor),
        SCORING=SCORING_IDS[scoring_func], HAS_BIAS=bias is not None, HASH=tid2eid is not None,
        RENORM=renormalize, TOPK=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_T=block_t, BLOCK_E=block_e,
    )
    return weights, indices


# =========================================================================================
# alignment: chunk histograms -> one scan program -> stable placement by an in-chunk sort


@triton.jit
def _align_count_kernel(ids_ptr, chunk_counts_ptr, chunk_excl_ptr, num_slots, E,
                        CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1)
    valid = (e >= 0) & (e < E) & (offs < num_slots)
    e32 = tl.where(valid, e, 0).to(tl.int32)
    cols = tl.arange(0, BLOCK_E)
    # dropped slots were counted in bin 0 (no histogram mask: older Triton releases lack it)
    hist = tl.histogram(e32, BLOCK_E)
    hist = tl.where(cols == 0, hist - tl.sum((~valid).to(tl.int32), axis=0), hist)
    excl = tl.cumsum(hist, axis=0) - hist
    tl.store(chunk_counts_ptr + c * E + cols, hist, mask=cols < E)
    tl.store(chunk_excl_ptr + c * E + cols, excl, mask=cols < E)


@triton.jit
def _align_scan_kernel(chunk_counts_ptr, chunk_off_ptr, counts_ptr, block_expert_ptr, num_padded_ptr,
                       num_chunks, E, n_blocks,
                       BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr):
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    total = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, num_chunks, CT):
        cr = c0 + tl.arange(0, CT)
        tile = tl.load(chunk_counts_ptr + cr[:, None] * E + cols[None, :],
                       mask=(cr[:, None] < num_chunks) & cmask[None, :], other=0)
        total += tl.sum(tile, axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(counts_ptr + cols, total, mask=cmask)
    num_padded = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, num_padded)
    carry = starts
    for c0 in range(0, num_chunks, CT):
        cr = c0 + tl.arange(0, CT)
        m = (cr[:, None] < num_chunks) & cmask[None, :]
        tile = tl.load(chunk_counts_ptr + cr[:, None] * E + cols[None, :], mask=m, other=0)
        incl = tl.cumsum(tile, axis=0)
        tl.store(chunk_off_ptr + cr[:, None] * E + cols[None, :], carry[None, :] + incl - tile, mask=m)
        carry += tl.sum(tile, axis=0)
    ends_m = tl.where(cmask, ends, 2147483647)
    for b0 in range(0, n_blocks, BT):
        b = b0 + tl.arange(0, BT)
        row = b * BLOCK_M
        expert = tl.sum((ends_m[None, :] <= row[:, None]).to(tl.int32), axis=1)
        expert = tl.where(row < num_padded, expert, -1)
        tl.store(block_expert_ptr + b, expert, mask=b < n_blocks)


@triton.jit
def _align_place_kernel(ids_ptr, chunk_off_ptr, chunk_excl_ptr, sorted_ids_ptr, slot_pos_ptr,
                        num_slots, E, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    local = tl.arange(0, CHUNK)
    offs = c * CHUNK + local
    inb = offs < num_slots
    e = tl.load(ids_ptr + offs, mask=inb, other=-1)
    valid = (e >= 0) & (e < E) & inb
    key = tl.where(valid, e, E).to(tl.int32) * CHUNK + local
    skey = tl.sort(key)
    se = skey // CHUNK
    slot = c * CHUNK + skey % CHUNK
    ok = (se < E) & (slot < num_slots)
    se_c = tl.where(ok, se, 0)
    base = tl.load(chunk_off_ptr + c * E + se_c, mask=ok, other=0)
    first = tl.load(chunk_excl_ptr + c * E + se_c, mask=ok, other=0)
    pos = base + local - first
    tl.store(sorted_ids_ptr + pos, slot.to(tl.int32), mask=ok)
    tl.store(slot_pos_ptr + slot, tl.where(ok, pos, -1).to(tl.int32), mask=slot < num_slots)


def align_triton(top_k_index: torch.Tensor, num_experts: int, block_m: int, chunk: int | None = None) -> Alignment:
    """Triton version of :func:`dsv41.kernels.reference.align_reference` (identical output)."""
    _device_ok(top_k_index)
    flat = top_k_index.reshape(-1).contiguous()
    device = flat.device
    num_slots = flat.numel()
    if chunk is None:
        chunk = 64 if interpreting() else 1024
    num_chunks = max(1, triton.cdiv(num_slots, chunk))
    capacity = align_capacity(num_slots, num_experts, block_m)
    n_blocks = capacity // block_m
    block_e = triton.next_power_of_2(num_experts)
    chunk_counts = torch.empty((num_chunks, num_experts), dtype=torch.int32, device=device)
    chunk_excl = torch.empty_like(chunk_counts)
    chunk_off = torch.empty_like(chunk_counts)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    block_expert = torch.empty(n_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    sorted_ids = torch.full((capacity,), num_slots, dtype=torch.int32, device=device)
    slot_pos = torch.empty(num_slots, dtype=torch.int32, device=device)
    if num_slots:
        _align_count_kernel[(num_chunks,)](flat, chunk_counts, chunk_excl, num_slots, num_experts,
                                           CHUNK=chunk, BLOCK_E=block_e)
    else:
        chunk_counts.zero_()
    ct = max(1, min(64, 8192 // block_e))
    bt = max(16, min(256, 16384 // block_e))
    _align_scan_kernel[(1,)](chunk_counts, chunk_off, counts, block_expert, num_padded, num_chunks, num_experts,
                             n_blocks, BLOCK_M=block_m, BLOCK_E=block_e, CT=ct, BT=bt,
                             num_warps=4 if interpreting() else 8)
    if num_slots:
        _align_place_kernel[(num_chunks,)](flat, chunk_off, chunk_excl, sorted_ids, slot_pos, num_slots, num_experts,
                                           CHUNK=chunk)
    return Alignment(sorted_ids, block_expert, num_padded, slot_pos, counts, block_m)


# =========================================================================================
# grouped expert GEMMs


@triton.jit
def _e2m1_value(code):
    """e2m1 code (int32, 0..15) -> float32 value."""
    mag = code & 7
    ex = mag >> 1
    man = (mag & 1).to(tl.float32)
    pw = (1 << tl.maximum(ex - 1, 0)).to(tl.float32)
    v = tl.where(ex == 0, 0.5 * man, (2.0 + man) * pw * 0.5)
    return tl.where((code & 8) != 0, -v, v)


@triton.jit
def _load_b(w_ptr, s_ptr, e, n_idx, k0, N_ROWS, K, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
            n_mask, WFMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight tile B[k, n] = W[e, n, k0 + k] as float32 (dense or FP8 block; MXFP4 is loaded separately)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    mask = (kk[:, None] < K) & n_mask[None, :]
    ptrs = w_ptr + e * stride_we + n_idx[None, :].to(tl.int64) * stride_wn + kk[:, None]
    b = tl.load(ptrs, mask=mask, other=0.0)
    if WFMT == 1:
        sc = tl.load(s_ptr + e * stride_se + (n_idx // 128) * stride_sn + (k0 // 128) * stride_sk,
                     mask=n_mask, other=0.0)
        b = b.to(tl.float32) * sc[None, :]
    return b


@triton.jit
def _load_b_fp4(w_ptr, s_ptr, e, n_idx, k0, K, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                n_mask, BLOCK_K: tl.constexpr):
    """MXFP4 tile: returns (B_even[k/2, n], B_odd[k/2, n]) as float32 for input columns k0+2i, k0+2i+1."""
    half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask = (half[:, None] * 2 < K) & n_mask[None, :]
    p = tl.load(w_ptr + e * stride_we + n_idx[None, :].to(tl.int64) * stride_wn + half[:, None],
                mask=mask, other=0).to(tl.int32) & 255
    sb = tl.load(s_ptr + e * stride_se + n_idx[None, :].to(tl.int64) * stride_sn + (half[:, None] // 16) * stride_sk,
                 mask=mask, other=127).to(tl.int32) & 255
    scale = tl.exp2(sb.to(tl.float32) - 127.0)
    lo = _e2m1_value(p & 15) * scale
    hi = _e2m1_value(p >> 4) * scale
    return lo, hi


@triton.jit
def _round_bf16(x, RNE: tl.constexpr):
    """The interpreter converts float32 -> bfloat16 by truncation; with RNE the value is first rounded
    to the nearest bfloat16 (ties to even) so that the truncating cast is exact, as on the GPU."""
    if RNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, s_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr, topk_w_ptr,
    N, K, num_slots, top_k, up_offset, limit,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_om,
    MODE: tl.constexpr, WFMT: tl.constexpr, F32: tl.constexpr, RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """MODE 0: gate/up + clamped SwiGLU, A rows gathered by token, output in padded-row order.
    MODE 1: down projection x routing weight, A rows in padded-row order, output rows = slot."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    gid = pid // group
    first_m = gid * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    if gsize <= 0:
        return
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize
    if pid_n >= num_pid_n:
        return
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    e = e.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ids_ptr + rows)
    row_ok = slot < num_slots
    if MODE == 0:
        a_row = (slot // top_k).to(tl.int64)
    else:
        a_row = rows.to(tl.int64)
    n_idx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_idx < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if MODE == 0:
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if WFMT == 2:
            half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            amask = row_ok[:, None] & (half[None, :] * 2 < K)
            a_base = a_ptr + a_row[:, None] * stride_am + half[None, :] * 2
            a_even = tl.load(a_base, mask=amask, other=0.0)
            a_odd = tl.load(a_base + 1, mask=amask, other=0.0)
            lo, hi = _load_b_fp4(w_ptr, s_ptr, e, n_idx, k0, K, stride_we, stride_wn, stride_se, stride_sn,
                                 stride_sk, n_mask, BLOCK_K)
            acc = _dot(a_even, lo, acc, F32)
            acc = _dot(a_odd, hi, acc, F32)
            if MODE == 0:
                lo, hi = _load_b_fp4(w_ptr, s_ptr, e, n_idx + up_offset, k0, K, stride_we, stride_wn, stride_se,
                                     stride_sn, stride_sk, n_mask, BLOCK_K)
                acc_u = _dot(a_even, lo, acc_u, F32)
                acc_u = _dot(a_odd, hi, acc_u, F32)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + a_row[:, None] * stride_am + kk[None, :],
                        mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
            b = _load_b(w_ptr, s_ptr, e, n_idx, k0, N, K, stride_we, stride_wn, stride_se, stride_sn, stride_sk,
                        n_mask, WFMT, BLOCK_K)
            acc = _dot(a, b, acc, F32)
            if MODE == 0:
                b = _load_b(w_ptr, s_ptr, e, n_idx + up_offset, k0, N, K, stride_we, stride_wn, stride_se,
                            stride_sn, stride_sk, n_mask, WFMT, BLOCK_K)
                acc_u = _dot(a, b, acc_u, F32)
    if MODE == 0:
        g = tl.minimum(acc, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        res = g / (1.0 + tl.exp(-g)) * u
        out_rows = rows.to(tl.int64)
        omask = n_mask[None, :] & (rows[:, None] >= 0)
    else:
        w = tl.load(topk_w_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
        res = acc * w[:, None]
        out_rows = slot.to(tl.int64)
        omask = row_ok[:, None] & n_mask[None, :]
    res = _round_bf16(res, RNE)
    tl.store(out_ptr + out_rows[:, None] * stride_om + n_idx[None, :], res.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _reduce_kernel(y_ptr, idx_ptr, out_ptr, H, E, TOPK: tl.constexpr, BLOCK_H: tl.constexpr, RNE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        e = tl.load(idx_ptr + t * TOPK + j)
        ok = (e >= 0) & (e < E)
        v = tl.load(y_ptr + (t * TOPK + j) * H + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += tl.where(ok, v, 0.0)  # rows of dropped slots were never written
    acc = _round_bf16(acc, RNE)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------- configs


def _cfg(bn, bk, gm, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}, num_warps=warps, num_stages=stages)


if interpreting():
    # one small config: the interpreter runs each program serially in Python
    DECODE_CONFIGS = PREFILL_CONFIGS = [_cfg(32, 32, 1, 4, 1)]
else:
    # few tokens per expert: weight-streaming, many N tiles to occupy all SMs
    DECODE_CONFIGS = [_cfg(32, 128, 1, 4, 4), _cfg(64, 128, 1, 4, 4), _cfg(64, 64, 1, 4, 5), _cfg(128, 128, 1, 8, 3)]
    # many tokens per expert: compute-bound tiles, grouped ordering for L2 reuse of weight tiles
    PREFILL_CONFIGS = [_cfg(128, 64, 8, 8, 4), _cfg(128, 64, 8, 8, 3), _cfg(64, 128, 8, 4, 4), _cfg(64, 64, 8, 4, 4)]

#: autotune the GEMM tile shapes (off: the first config of each regime, e.g. for quick correctness runs)
AUTOTUNE = os.environ.get("DSV41_TRITON_AUTOTUNE", "1") != "0"
_TUNE_KEY = ["N", "K", "MODE", "WFMT", "F32", "BLOCK_M"]
_gemm_decode = triton.autotune(configs=DECODE_CONFIGS, key=_TUNE_KEY)(_moe_gemm_kernel)
_gemm_prefill = triton.autotune(configs=PREFILL_CONFIGS, key=_TUNE_KEY)(_moe_gemm_kernel)


def choose_block_m(num_slots: int, num_experts: int) -> int:
    """Rows per expert block: 16 for decode-like routing (few slots per expert), 64 / 128 for prefill."""
    per_expert = num_slots / max(num_experts, 1)
    if interpreting() or per_expert <= 24:
        return 16
    if per_expert <= 256:
        return 64
    return 128


# ----------------------------------------------------------------------------- weights


def expert_weights(experts) -> tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(format, gate_up, gate_up_scale, down, down_scale) for a transformers experts module, one of
    ours, or :class:`dsv41.kernels.reference.QuantizedExperts`."""
    fmt = getattr(experts, "fmt", None)
    if fmt in ("fp8", "mxfp4"):
        gs, ds = experts.gate_up_scale, experts.down_scale
        if fmt == "fp8":
            gs, ds = _fp8_scale_f32(gs), _fp8_scale_f32(ds)
        else:
            gs, ds = gs.view(torch.uint8), ds.view(torch.uint8)
        return fmt, experts.gate_up_q, gs, experts.down_q, ds
    gu, dn = experts.gate_up_proj, experts.down_proj
    if gu.dtype == torch.float8_e4m3fn:
        gs = getattr(experts, "gate_up_proj_scale_inv", None)
        ds = getattr(experts, "down_proj_scale_inv", None)
        if gs is None or ds is None:
            raise ValueError("FP8 expert weights need gate_up_proj_scale_inv and down_proj_scale_inv (128x128 blocks)")
        return "fp8", gu, _fp8_scale_f32(gs), dn, _fp8_scale_f32(ds)
    if getattr(experts, "is_transposed", False):
        raise ValueError("dsv41 kernels expect gate_up_proj [E, 2I, H] and down_proj [E, H, I] (is_transposed=False)")
    if getattr(experts, "has_bias", False) or getattr(experts, "has_post_expert_norm", False):
        raise ValueError("dsv41 kernels support experts without biases or post-expert norms")
    return "dense", gu, None, dn, None


def _fp8_scale_f32(s: torch.Tensor) -> torch.Tensor:
    if s.dtype in (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8)):
        return torch.exp2(s.view(torch.uint8).float() - 127)
    return s.float()


def _check_fp8_blocks(scale: torch.Tensor, w: torch.Tensor, name: str) -> None:
    n, k = w.shape[-2:]
    want = (w.shape[0], math.ceil(n / 128), math.ceil(k / 128))
    if tuple(scale.shape) != want:
        raise ValueError(f"{name}: FP8 scale shape {list(scale.shape)} does not match 128x128 blocks of {list(w.shape)} "
                         f"(expected {list(want)})")


# ----------------------------------------------------------------------------- entry point


def _rne(out: torch.Tensor) -> bool:
    return interpreting() and out.dtype == torch.bfloat16


def _launch_gemm(a, w, s, out, al: Alignment, topk_w, n, k, num_slots, top_k, up_offset, limit, mode, wfmt, f32):
    kernel = _gemm_decode if al.block_m <= 16 else _gemm_prefill
    meta_kw = {}
    if not AUTOTUNE:
        cfg = (DECODE_CONFIGS if al.block_m <= 16 else PREFILL_CONFIGS)[0]
        kernel = _moe_gemm_kernel
        meta_kw = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid = lambda meta: (triton.cdiv(al.capacity, al.block_m) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    sd = s if s is not None else w
    strides_s = (s.stride(0), s.stride(1), s.stride(2)) if s is not None else (0, 0, 0)
    kernel[grid](
        a, w, sd, out, al.sorted_ids, al.block_expert, al.num_padded, topk_w,
        n, k, num_slots, top_k, up_offset, float(limit),
        a.stride(0), w.stride(0), w.stride(1), *strides_s, out.stride(0),
        MODE=mode, WFMT=WFMT_IDS[wfmt], F32=f32, RNE=_rne(out), BLOCK_M=al.block_m, **meta_kw,
    )


def triton_experts(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   block_m: int | None = None) -> torch.Tensor:
    """Experts-interface backend: fused Triton grouped GEMMs (forward only)."""
    fmt, gu, gs, dn, ds = expert_weights(experts)
    if torch.is_grad_enabled() and (hidden_states.requires_grad or gu.requires_grad or dn.requires_grad):
        # the kernels have no backward: training keeps the autograd-capable PyTorch path
        from dsv41.modeling.moe_deepseek_v4 import cpu_grouped_experts

        return cpu_grouped_experts(experts, hidden_states, top_k_index, top_k_weights)
    _device_ok(hidden_states)
    t, hdim = hidden_states.shape
    top_k = top_k_index.shape[1]
    num_experts = gu.shape[0]
    inter = dn.shape[-1] * (2 if fmt == "mxfp4" else 1)
    # rows of the up projection start at up_offset (== inter, or padded to whole FP8 scale blocks)
    up_offset = int(getattr(experts, "up_offset", inter))
    if up_offset < inter or gu.shape[1] != 2 * up_offset or dn.shape[1] != hdim:
        raise ValueError(f"expert shapes do not match: gate_up {list(gu.shape)}, down {list(dn.shape)}, hidden {hdim}"
                         + (f", up rows at {up_offset}" if up_offset != inter else ""))
    if fmt == "fp8":
        _check_fp8_blocks(gs, gu, "gate_up_proj")
        _check_fp8_blocks(ds, dn, "down_proj")
    if fmt == "mxfp4" and (hdim % 32 or inter % 32):
        raise ValueError(f"MXFP4 experts need hidden ({hdim}) and intermediate ({inter}) sizes divisible by 32")
    out = torch.empty_like(hidden_states)
    if t == 0:
        return out
    x = hidden_states.contiguous()
    idx = top_k_index.contiguous()
    wts = top_k_weights.reshape(-1).contiguous()
    num_slots = t * top_k
    bm = block_m or choose_block_m(num_slots, num_experts)
    al = align_triton(idx, num_experts, bm)
    f32 = interpreting() or x.dtype == torch.float32 or (fmt == "dense" and gu.dtype == torch.float32)
    act_dtype = torch.float32 if x.dtype == torch.float32 else x.dtype
    h = torch.empty((al.capacity, inter), dtype=act_dtype, device=x.device)
    _launch_gemm(x, gu, gs, h, al, wts, inter, hdim, num_slots, top_k, up_offset, experts.limit, 0, fmt, f32)
    y = torch.empty((num_slots, hdim), dtype=act_dtype, device=x.device)
    _launch_gemm(h, dn, ds, y, al, wts, hdim, inter, num_slots, top_k, 0, experts.limit, 1, fmt, f32)
    block_h = min(1024, triton.next_power_of_2(hdim))
    _reduce_kernel[(t, triton.cdiv(hdim, block_h))](y, idx, out, hdim, num_experts, TOPK=top_k, BLOCK_H=block_h,
                                                     RNE=_rne(out))
    return out
