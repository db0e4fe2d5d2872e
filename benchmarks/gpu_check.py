"""One prepared GPU check for an H200 (or any CUDA GPU), finishing within ~8 minutes:

1. builds the CUDA C++ extension (torch.utils.cpp_extension JIT);
2. runs the kernels for real against the PyTorch references: routing (3 scoring functions, hash),
   alignment (Triton and CUDA, exact equality), expert GEMMs (Triton dense fp32/bf16/fp16, FP8
   block, MXFP4; the CUDA backend), on small and V4-sized shapes;
3. benchmarks a full-size V4-Flash MoE layer (hidden 4096, 256 experts, top-6, I 2048) in bf16 and
   with FP8 / MXFP4 expert weights for T in 1, 16, 64, 256, 4096, 16384, next to transformers'
   grouped_mm in the same run, with CUDA events, medians, weights of several layers rotated, and
   the roofline min(P, AI * BW) from a same-run device-to-device copy (BW) and dense bf16 GEMM (P).

    python benchmarks/gpu_check.py [--budget-s 450] [--tokens ...] [--layers 2] [--json out.json]

Exit status 1 if any correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

H, E, K, I = 4096, 256, 6, 2048
DEVICE = "cuda"  # the checks below may be dry-run on CPU under TRITON_INTERPRET with tiny shapes
START = time.time()
# correctness shapes: (T, E, k) routing; (T, E, k, BLOCK_M) alignment; (T, E, H, I, k) experts
ROUTE_SHAPES = [(1, 8, 1), (333, 256, 6), (64, 64, 8)]
ALIGN_SHAPES = [(1, 256, 6, 16), (1000, 256, 6, 64), (16384, 256, 6, 128), (5000, 16, 8, 16)]
EXPERT_SHAPES = [(1, 8, 64, 32, 2), (5, 6, 40, 24, 2), (3, 16, 32, 16, 1), (7, 10, 64, 32, 8), (300, 64, 1024, 256, 6)]
QUANT_SHAPES = [(1, 8, 256, 128, 2), (200, 32, 1024, 512, 6), (3, 4, 160, 96, 2)]
HASH_SHAPE = (77, 256, 6, 1000)  # tokens, experts, k, vocab
FAILURES: list[str] = []


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {msg}", flush=True)


def check(name: str, ok: bool, detail: str) -> None:
    log(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        FAILURES.append(f"{name}: {detail}")


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cuda_time(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds over `repeats` calls, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        return statistics.median(_wall(fn) for _ in range(repeats))
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class TfExperts:
    """The attributes transformers' grouped_mm_experts_forward reads (DeepseekV4Experts layout)."""

    def __init__(self, gate_up, down, limit):
        self.gate_up_proj, self.down_proj, self.limit = gate_up, down, limit
        self.num_experts = gate_up.shape[0]
        self.has_gate, self.has_bias, self.is_transposed = True, False, False
        self.has_post_expert_norm, self._is_expert_parallel = False, False

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)


# ----------------------------------------------------------------------------- correctness


def correctness(ext_ok: bool) -> None:
    from dsv41.kernels import reference as ref
    from dsv41.kernels import triton_moe as tm
    from dsv41.modeling.moe_deepseek_v4 import MOE_BACKENDS, reference_experts, resolve_backend

    dev = torch.device(DEVICE)
    check("registry", "triton" in MOE_BACKENDS and resolve_backend("auto", dev) in ("triton", "cuda"),
          f"backends {sorted(MOE_BACKENDS)}, auto -> {resolve_backend('auto', dev)}")
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    for scoring in ("sqrtsoftplus", "sigmoid", "softmax"):
        for t, e, k in ROUTE_SHAPES:
            logits = torch.randn(t, e, device=dev, generator=gen) * 3
            bias = torch.randn(e, device=dev, generator=gen) * 0.1
            w0, i0 = ref.route_reference(logits, k, scoring, bias, 1.5)
            w1, i1 = tm.route_triton(logits, k, scoring, bias, 1.5)
            check(f"routing {scoring} T={t} E={e} k={k}", torch.equal(i0, i1) and torch.allclose(w0, w1, atol=1e-6),
                  f"max |dw| {(w0 - w1).abs().max().item():.2e}")
    ht, he, hk, hv = HASH_SHAPE
    tid2eid = torch.stack([torch.randperm(he, device=dev, generator=gen)[:hk] for _ in range(hv)])
    ids = torch.randint(0, hv, (ht,), device=dev, generator=gen)
    logits = torch.randn(ht, he, device=dev, generator=gen)
    w0, i0 = ref.route_reference(logits, hk, "sqrtsoftplus", None, 1.5, input_ids=ids, tid2eid=tid2eid)
    w1, i1 = tm.route_triton(logits, hk, "sqrtsoftplus", None, 1.5, input_ids=ids, tid2eid=tid2eid)
    check("hash routing", torch.equal(i0, i1) and torch.allclose(w0, w1, atol=1e-6), f"max |dw| {(w0 - w1).abs().max().item():.2e}")

    for t, e, k, bm in ALIGN_SHAPES:
        idx = torch.topk(torch.rand(t, e, device=dev, generator=gen), k, dim=-1).indices
        idx[0, 0] = e  # a dropped slot
        want = ref.align_reference(idx, e, bm)
        impls = {"triton": lambda: tm.align_triton(idx, e, bm)}
        if ext_ok:
            from dsv41.kernels.cuda_ext import align_cuda

            impls["cuda"] = lambda: align_cuda(idx, e, bm)
        for name, fn in impls.items():
            got = fn()
            same = all(torch.equal(getattr(got, f), getattr(want, f))
                       for f in ("sorted_ids", "block_expert", "num_padded", "slot_pos", "counts"))
            check(f"align {name} T={t} E={e} k={k} BM={bm}", same, "identical to reference" if same else "MISMATCH")

    for t, e, h, i, k in EXPERT_SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ex = SimpleNamespace(
                gate_up_proj=(torch.randn(e, 2 * i, h, device=dev, generator=gen) * h**-0.5).to(dtype),
                down_proj=(torch.randn(e, h, i, device=dev, generator=gen) * i**-0.5).to(dtype), limit=1.0)
            idx = torch.stack([torch.randperm(e, device=dev, generator=gen)[:k] for _ in range(t)])
            w = torch.rand(t, k, device=dev, generator=gen)
            x = torch.randn(t, h, device=dev, generator=gen).to(dtype)
            want = reference_experts(ex, x, idx, w)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            for name in ("triton", "cuda") if ext_ok else ("triton",):
                if name == "cuda" and h % 8:
                    continue  # grouped_mm needs 16-byte aligned rows
                got = MOE_BACKENDS[name](ex, x, idx, w)
                if dtype == torch.float32:
                    err = (got - want).abs().max().item()
                    ok = err <= tol
                else:
                    err = rel_err(got, want)
                    ok = err <= tol
                check(f"experts {name} {str(dtype)[6:]} T={t} E={e} H={h} I={i} k={k}", ok, f"error {err:.2e} (tol {tol})")
    for fmt in ("fp8", "mxfp4"):
        for t, e, h, i, k in QUANT_SHAPES:
            if fmt == "mxfp4" and (h % 32 or i % 32):
                continue
            gu = torch.randn(e, 2 * i, h, device=dev, generator=gen) * h**-0.5
            dn = torch.randn(e, h, i, device=dev, generator=gen) * i**-0.5
            q = ref.QuantizedExperts.from_dense(fmt, gu, dn, 1.5)
            dgu, ddn = q.dequantized(torch.float32)
            idx = torch.stack([torch.randperm(e, device=dev, generator=gen)[:k] for _ in range(t)])
            w = torch.rand(t, k, device=dev, generator=gen)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(t, h, device=dev, generator=gen).to(dtype)
                deq = SimpleNamespace(gate_up_proj=dgu.to(dtype), down_proj=ddn.to(dtype), limit=1.5)
                want = reference_experts(deq, x, idx, w)
                got = tm.triton_experts(q, x, idx, w)
                err = rel_err(got, want)
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                check(f"experts triton {fmt} {str(dtype)[6:]} T={t} E={e} H={h} I={i}", err <= tol, f"rel error {err:.2e}")


def model_checks() -> None:
    """The bundled checkpoint on the GPU: every backend gives the reference logits, and quantized
    checkpoints (FP8 and FP4 experts) load with the experts kept quantized for the Triton kernels."""
    import tempfile

    from dsv41.modeling import DeepseekV4ForCausalLM
    from dsv41.quantization import QuantSpec, load_quantized_model, quantize_checkpoint
    from dsv41.quantization.experts import DeepseekV4QuantizedExperts

    ckpt = Path(__file__).resolve().parents[1] / "dsv41" / "checkpoints" / "dsv41-tiny"
    ids = torch.randint(0, 4096, (2, 200), generator=torch.Generator().manual_seed(0))
    model = DeepseekV4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, device_map=DEVICE).eval()
    logits = {}
    for backend in ("reference", "cpu_grouped", "triton", "cuda"):
        try:
            model.set_moe_backend(backend)
        except ValueError as exc:
            log(f"model backend {backend}: not available ({exc})")
            continue
        with torch.no_grad():
            logits[backend] = model(ids.to(DEVICE), use_cache=False).logits.float().cpu()
    for backend, got in logits.items():
        err = (got - logits["reference"]).abs().max().item()
        check(f"whole model fp32 {backend} vs reference", err <= 1e-3, f"max |dlogits| {err:.2e}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, spec in (("fp8", QuantSpec("fp8", partial_blocks=True)),
                            ("fp4-experts", QuantSpec("fp8", partial_blocks=True, expert_dtype="fp4"))):
            out = Path(tmp) / label
            quantize_checkpoint(ckpt, out, spec)
            want_model = load_quantized_model(DeepseekV4ForCausalLM, out, dtype=torch.float32, quantized_experts="dequantize")
            # on CUDA the default moe_backend="auto" must pick Triton and keep the experts quantized
            kept = DeepseekV4ForCausalLM.from_pretrained(out, dtype=torch.float32, device_map=DEVICE,
                                                         moe_backend="triton" if DEVICE == "cpu" else None)
            ex = kept.model.layers[1].mlp.experts
            ok_kept = isinstance(ex, DeepseekV4QuantizedExperts) and ex.backend == "triton" and ex.gate_up_q.device.type == DEVICE
            with torch.no_grad():
                want = want_model(ids, use_cache=False).logits.float()
                got = kept(ids.to(DEVICE), use_cache=False).logits.float().cpu()
            err = (got - want).abs().max().item()
            agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
            check(f"quantized load {label}: experts kept for triton on GPU, logits vs CPU dequantized", ok_kept and err <= 1e-2,
                  f"kept={ok_kept} ({type(ex).__name__}, backend {getattr(ex, 'backend', '?')}), max |dlogits| {err:.2e}, "
                  f"top-1 agreement {agree:.4f}")


# ----------------------------------------------------------------------------- benchmark


def random_layers(n: int, gen):
    """n full-size layers: bf16 weights plus FP8 / MXFP4 codes of the same size (random codes: the
    speed of a kernel does not depend on the values)."""
    from dsv41.kernels.reference import QuantizedExperts

    layers = []
    for _ in range(n):
        gu = torch.randn(E, 2 * I, H, device=DEVICE, dtype=torch.bfloat16, generator=gen) * H**-0.5
        dn = torch.randn(E, H, I, device=DEVICE, dtype=torch.bfloat16, generator=gen) * I**-0.5
        fp8 = QuantizedExperts(
            "fp8",
            (torch.randn(E, 2 * I, H, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 64).clamp(-448, 448).to(torch.float8_e4m3fn),
            torch.full((E, math.ceil(2 * I / 128), math.ceil(H / 128)), 1 / 64 * H**-0.5, device=DEVICE),
            (torch.randn(E, H, I, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 64).clamp(-448, 448).to(torch.float8_e4m3fn),
            torch.full((E, math.ceil(H / 128), math.ceil(I / 128)), 1 / 64 * I**-0.5, device=DEVICE), 10.0, H, I)
        fp4 = QuantizedExperts(
            "mxfp4",
            torch.randint(0, 256, (E, 2 * I, H // 2), device=DEVICE, dtype=torch.uint8, generator=gen),
            torch.full((E, 2 * I, H // 32), 120, device=DEVICE, dtype=torch.uint8),
            torch.randint(0, 256, (E, H, I // 2), device=DEVICE, dtype=torch.uint8, generator=gen),
            torch.full((E, H, I // 32), 121, device=DEVICE, dtype=torch.uint8), 10.0, H, I)
        layers.append({"bf16": SimpleNamespace(gate_up_proj=gu, down_proj=dn, limit=10.0), "fp8": fp8, "mxfp4": fp4})
    return layers


def limits(copy_bytes: int = 2 * 2**30, gemm: int = 8192) -> tuple[float, float]:
    n = copy_bytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), 10)
    bw = 2 * n * 2 / t
    src = dst = None  # free the copy buffers before the matmul
    a = torch.randn(gemm, gemm, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(gemm, gemm, device=DEVICE, dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, 10)
    return bw, 2 * gemm**3 / t


def bench(tokens: list[int], n_layers: int, budget_s: float, ext_ok: bool) -> list[dict]:
    from transformers.integrations.moe import grouped_mm_experts_forward

    from dsv41.kernels import triton_moe as tm
    from dsv41.kernels.cuda_ext import cuda_experts

    bw, peak = limits() if DEVICE == "cuda" else limits(2**24, 256)
    log(f"same-run limits: device-to-device copy {bw / 1e12:.2f} TB/s (read + write), dense bf16 GEMM {peak / 1e12:.0f} TFLOP/s")
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    layers = random_layers(n_layers, gen)
    if DEVICE == "cuda":
        log(f"{n_layers} layers of weights allocated ({torch.cuda.memory_allocated() / 1e9:.1f} GB on device)")
    router_w = torch.randn(E, H, device=DEVICE, dtype=torch.bfloat16, generator=gen) * H**-0.5
    bias = torch.randn(E, device=DEVICE, generator=gen) * 0.01
    rows = []
    header = (f"{'T':>6} {'impl':>14} {'hit':>4} {'time':>10} {'GB moved':>9} {'GFLOP':>8} {'TB/s':>6} {'TFLOP/s':>8} "
              f"{'roofline':>9} {'eff':>5}")
    print(header, flush=True)
    for t in tokens:
        if time.time() - START > budget_s:
            log(f"time budget reached: skipping T >= {t}")
            break
        x = torch.randn(t, H, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        logits = (x @ router_w.t()).float()
        w, idx = tm.route_triton(logits, K, "sqrtsoftplus", bias, 1.5)
        hit = int(torch.unique(idx).numel())
        flops = 2 * t * K * 3 * H * I
        t_route = cuda_time(lambda: tm.route_triton(logits, K, "sqrtsoftplus", bias, 1.5), 20)
        bm = tm.choose_block_m(t * K, E)
        t_align = cuda_time(lambda: tm.align_triton(idx, E, bm), 20)
        impls = {
            "transformers": ("bf16", lambda L: grouped_mm_experts_forward(TfExperts(L["bf16"].gate_up_proj, L["bf16"].down_proj, 10.0), x, idx, w)),
            "triton_bf16": ("bf16", lambda L: tm.triton_experts(L["bf16"], x, idx, w)),
            "triton_fp8": ("fp8", lambda L: tm.triton_experts(L["fp8"], x, idx, w)),
            "triton_mxfp4": ("mxfp4", lambda L: tm.triton_experts(L["mxfp4"], x, idx, w)),
        }
        if ext_ok:
            impls["cuda_bf16"] = ("bf16", lambda L: cuda_experts(L["bf16"], x, idx, w, block_m=bm))
        res = {"tokens": t, "experts_hit": hit, "flops": flops, "route_s": t_route, "align_s": t_align, "impls": {}}
        for name, (fmt, fn) in impls.items():
            for L in layers:  # compile / autotune outside the timing
                fn(L)
            counter = [0]

            def call(fn=fn):
                counter[0] += 1
                return fn(layers[counter[0] % len(layers)])

            secs = cuda_time(call, 20 if t <= 4096 else 10, warmup=len(layers))
            wbytes_per_expert = {"bf16": 3 * H * I * 2, "fp8": 3 * H * I + 3 * H * I / 128**2 * 4,
                                 "mxfp4": 3 * H * I / 2 + 3 * H * I / 32}[fmt]
            act = t * H * 2 * 2 + t * K * (I + H) * 2 * 2
            nbytes = hit * wbytes_per_expert + act
            roof_rate = min(peak, flops / nbytes * bw)
            t_min = max(flops / peak, nbytes / bw)
            eff = t_min / secs
            res["impls"][name] = {"time_s": secs, "bytes": nbytes, "roofline_tflops": roof_rate / 1e12, "efficiency": eff}
            print(f"{t:>6} {name:>14} {hit:>4} {secs * 1e3:>8.3f}ms {nbytes / 1e9:>9.2f} {flops / 1e9:>8.1f} "
                  f"{nbytes / secs / 1e12:>6.2f} {flops / secs / 1e12:>8.1f} {roof_rate / 1e12:>7.0f}TF {100 * eff:>4.0f}%",
                  flush=True)
        tb = res["impls"]["triton_bf16"]["time_s"]
        log(f"T={t}: routing {t_route * 1e6:.0f} us + alignment {t_align * 1e6:.0f} us = "
            f"{100 * (t_route + t_align) / tb:.1f}% of the bf16 layer; speedups vs transformers grouped_mm: "
            + ", ".join(f"{n} x{res['impls']['transformers']['time_s'] / v['time_s']:.2f}" for n, v in res["impls"].items() if n != "transformers")
            + f"; FP8 x{tb / res['impls']['triton_fp8']['time_s']:.2f}, MXFP4 x{tb / res['impls']['triton_mxfp4']['time_s']:.2f} vs own bf16")
        rows.append(res)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 4096, 16384])
    parser.add_argument("--layers", type=int, default=2, help="full-size layers rotated between calls (12.9 GB bf16 each)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting new benchmark sizes after this")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch", file=sys.stderr)
        return 2
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    import dsv41.kernels as kernels

    log(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton.__version__}; backends: {kernels.backend_status()}")
    ext_ok = False
    if not args.skip_build:
        from dsv41.kernels.cuda_ext import load_extension

        t0 = time.time()
        try:
            load_extension(verbose=False)
            ext_ok = True
            log(f"CUDA extension built in {time.time() - t0:.0f} s")
        except Exception as exc:  # report and continue with the Triton checks
            check("cuda extension build", False, f"{type(exc).__name__}: {str(exc)[-3000:]}")
    from dsv41.kernels import triton_moe

    triton_moe.AUTOTUNE = False  # correctness does not need tuned tiles: fewer compilations
    correctness(ext_ok)
    try:
        model_checks()
    except Exception as exc:
        check("model checks", False, f"{type(exc).__name__}: {exc}")
    triton_moe.AUTOTUNE = True
    rows = []
    try:
        rows = bench(args.tokens, args.layers, args.budget_s, ext_ok)
    except Exception as exc:
        check("benchmark", False, f"{type(exc).__name__}: {exc}")
        import traceback

        traceback.print_exc()
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "failures": FAILURES}, indent=2))
    log(f"done: {len(FAILURES)} correctness failure(s)" + ("".join(f"\n  - {f}" for f in FAILURES)))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
