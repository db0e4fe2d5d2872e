"""CPU MoE benchmark: our cpu_grouped experts vs transformers' experts implementations (eager,
grouped_mm) on the same weights, for a V4-Flash-shaped layer scaled down to fit a CPU
(hidden 1024, 64 routed experts, top-6, moe_intermediate 256; the shared expert is identical for
every implementation and is not part of the timed experts call).

Everything is measured in one run, interleaved (each repeat runs every implementation once, on the
next layer of a rotation of several layers' weights, after reading a 512 MiB buffer so that no call
is served from the L3 cache), and the medians are compared with two limits measured in the same run:

* compute: one dense matmul doing the same FLOPs ([T*k, H] x [H, 3I]);
* bandwidth: a large memory copy (read + write bytes), for decode efficiency on the bytes of the
  experts actually hit.

    python benchmarks/moe_cpu.py [--tokens 1 16 64 256 2048] [--dtypes bf16 fp32] [--repeats 5]
                                 [--layers 4] [--out DIR] [--variants] [--chain]

Writes moe_cpu.json, moe_cpu.md and moe_cpu.png under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

E, H, I, K = 64, 1024, 256, 6
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_layers(n_layers: int, dtype: torch.dtype, seed: int = 0):
    """n_layers independent transformers DeepseekV4Experts modules sharing one config, plus a router."""
    import transformers
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts, DeepseekV4TopKRouter

    import dsv41.kernels  # noqa: F401  registers dsv41_cpu_grouped with transformers

    config = transformers.DeepseekV4Config(
        hidden_size=H, n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=I, swiglu_limit=10.0,
        vocab_size=128, num_hidden_layers=1,
    )
    config._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        ex = DeepseekV4Experts(config)
        with torch.no_grad():
            ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=gen) * H**-0.5)
            ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=gen) * I**-0.5)
        layers.append(ex.to(dtype).eval().requires_grad_(False))
    router = DeepseekV4TopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * H**-0.5)
        router.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.01)
    return config, layers, router.eval().requires_grad_(False)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_rate(mib: int = 512, repeats: int = 5) -> float:
    """Bytes read + written per second by a large tensor copy."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = median_time(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / t


def dense_rate(m: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of one dense matmul [m, H] x [H, 3I] (same FLOPs as the routed experts for m = T*k)."""
    a = torch.randn(m, H, dtype=dtype)
    w = torch.randn(3 * I, H, dtype=dtype)
    torch.nn.functional.linear(a, w)
    t = median_time(lambda: torch.nn.functional.linear(a, w), repeats)
    return 2 * m * H * 3 * I / t


#: bytes read before every timed call so that it starts with a cold last-level cache (this machine's
#: L3 is about 300 MiB; rotating 4 layers alone is not enough for decode, which touches 6 experts)
FLUSH_MIB = 512
_FLUSH: list[torch.Tensor] = []


def flush_cache() -> None:
    if not _FLUSH:
        _FLUSH.append(torch.ones(FLUSH_MIB * 2**20 // 4, dtype=torch.float32))
    _FLUSH[0].sum()


def route(router, x: torch.Tensor, dtype: torch.dtype):
    """(weights in dtype, indices) chosen by the layer's router for x."""
    with torch.no_grad():
        _, weights, indices = router(x.float())
    return weights.to(dtype), indices


def via_module(config, name: str, x, indices, weights):
    """A call of the transformers experts module with experts implementation ``name``."""
    def run(ex):
        config._experts_implementation = name
        return ex(x, indices, weights)

    return run


def time_interleaved(fns: dict, layers, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every fn, interleaved: each repeat runs every fn once, on the next layer
    of the rotation, after reading the flush buffer (so no call is served from the L3 cache)."""
    times = {name: [] for name in fns}
    counter = 0
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn(layers[counter % len(layers)])
            counter += 1
        for _ in range(repeats):
            for name, fn in fns.items():
                ex = layers[counter % len(layers)]
                counter += 1
                flush_cache()
                t0 = time.perf_counter()
                fn(ex)
                times[name].append(time.perf_counter() - t0)
    return times


def bench_case(config, layers, router, dtype, tokens: int, impls: list[str], repeats: int, seed: int) -> dict:
    from dsv41.modeling import moe_deepseek_v4 as moe
    from dsv41.modeling.moe_deepseek_v4 import cpu_grouped_experts

    gen = torch.Generator().manual_seed(seed + tokens)
    x = torch.randn(tokens, H, generator=gen).to(dtype)
    weights, indices = route(router, x, dtype)
    hit = int(torch.unique(indices).numel())
    fns = {}
    for name in impls:
        if name == "ours_loop":
            fns[name] = lambda ex: cpu_grouped_experts(ex, x, indices, weights, gemm="loop")
        elif name == "ours_no_native":
            def without_native(ex):
                saved = list(moe.NATIVE_EXPERTS)
                moe.NATIVE_EXPERTS.clear()
                try:
                    return cpu_grouped_experts(ex, x, indices, weights)
                finally:
                    moe.NATIVE_EXPERTS.extend(saved)

            fns[name] = without_native
        else:
            fns[name] = via_module(config, name, x, indices, weights)
    # correctness guard: every implementation agrees with eager on this input
    with torch.no_grad():
        ref = fns["eager"](layers[0]).float()
        for name, fn in fns.items():
            err = ((fn(layers[0]).float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            limit = 2e-2 if dtype == torch.bfloat16 else 1e-4
            if not err <= limit:
                raise SystemExit(f"{name} disagrees with eager at T={tokens}: relative error {err:.3g} > {limit}")
    times = time_interleaved(fns, layers, repeats)
    med = {name: statistics.median(v) for name, v in times.items()}
    elem = torch.finfo(dtype).bits // 8
    return {
        "tokens": tokens,
        "experts_hit": hit,
        "flops": 2 * tokens * K * 3 * H * I,
        "weight_bytes_hit": hit * 3 * H * I * elem,
        "time_s": med,
        "times_s": times,
    }


def decode_chain(config, layers, router, dtype, repeats: int) -> dict:
    """One token, each call after the same flush as the main cases: the time of every layer of our
    decode call chain (ms, medians) — the native kernel alone, our Python dispatch around it, the
    transformers experts module around that — and the module with a no-op experts function (the
    framework's own cold-call floor), plus the hit bytes, so kernel-only bandwidth can be read off."""
    from transformers.integrations.moe import ExpertsInterface

    from dsv41.kernels import cpu_ext
    from dsv41.modeling.moe_deepseek_v4 import cpu_grouped_experts

    ExpertsInterface.register("dsv41_bench_noop", lambda self, hidden_states, idx, w: hidden_states)
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(7)).to(dtype)
    weights, indices = route(router, x, dtype)
    fns = {}
    if cpu_ext.cpu_native_supported()[0]:
        kernel = cpu_ext.load_cpu_extension().moe_experts
        fns["native kernel alone"] = lambda ex: kernel(ex.gate_up_proj, ex.down_proj, x, indices, weights, float(ex.limit), -1)
    fns["cpu_grouped_experts()"] = lambda ex: cpu_grouped_experts(ex, x, indices, weights)
    fns["transformers module (dsv41_cpu_grouped)"] = via_module(config, "dsv41_cpu_grouped", x, indices, weights)
    fns["transformers module (no-op experts)"] = via_module(config, "dsv41_bench_noop", x, indices, weights)
    times = time_interleaved(fns, layers, repeats)
    hit = int(torch.unique(indices).numel())
    return {"ms": {name: 1e3 * statistics.median(v) for name, v in times.items()},
            "weight_bytes_hit": hit * 3 * H * I * (torch.finfo(dtype).bits // 8)}


def summarize(case: dict, dense: float, bw: float) -> dict:
    t = case["time_s"]
    ours = t["dsv41_cpu_grouped"]
    transformers_best = min(t[n] for n in ("eager", "grouped_mm") if n in t)
    return {
        "ours_gflops": case["flops"] / ours / 1e9,
        "dense_gflops": dense / 1e9,
        "pct_of_dense": 100 * case["flops"] / ours / dense,
        "ours_gbps": case["weight_bytes_hit"] / ours / 1e9,
        "copy_gbps": bw / 1e9,
        "pct_of_bandwidth": 100 * case["weight_bytes_hit"] / ours / bw,
        "speedup_vs_eager": t["eager"] / ours,
        "speedup_vs_grouped_mm": t["grouped_mm"] / ours,
        "speedup_vs_best_transformers": transformers_best / ours,
    }


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_cpu.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# CPU MoE experts benchmark",
        "",
        f"Layer: hidden {H}, {E} experts, top-{K}, moe_intermediate {I}. Machine: {results['machine']}. "
        f"Memory copy (same run, measured next to every case; highest): {results['copy_gbps']:.1f} GB/s. Weight rotation: {results['layers']} layers "
        f"({results['rotation_mib']:.0f} MiB per dtype set), and {FLUSH_MIB} MiB read before every timed call (cold L3). "
        f"Medians of {results['repeats']} interleaved repeats.",
        "",
        "| dtype | T | experts hit | eager ms | grouped_mm ms | ours ms | ours GFLOP/s | dense GFLOP/s | % dense |"
        " ours GB/s | % copy BW | x eager | x grouped_mm | x best transformers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        t, s = row["time_s"], row["summary"]
        lines.append(
            f"| {row['dtype']} | {row['tokens']} | {row['experts_hit']} | {t['eager'] * 1e3:.2f} | "
            f"{t['grouped_mm'] * 1e3:.2f} | {t['dsv41_cpu_grouped'] * 1e3:.2f} | {s['ours_gflops']:.0f} | "
            f"{s['dense_gflops']:.0f} | {s['pct_of_dense']:.0f}% | {s['ours_gbps']:.1f} | {s['pct_of_bandwidth']:.0f}% | "
            f"{s['speedup_vs_eager']:.2f} | {s['speedup_vs_grouped_mm']:.2f} | {s['speedup_vs_best_transformers']:.2f} |"
        )
    for variant, what in (("ours_loop", "a per-expert mm loop for every size (no native kernel, no grouped_mm)"),
                          ("ours_no_native", "no native kernel (the PyTorch paths alone)")):
        extra = [r for r in results["rows"] if variant in r["time_s"]]
        if extra:
            lines += ["", f"Variant of ours with {what} (ms): "
                      + ", ".join(f"{r['dtype']} T={r['tokens']}: {r['time_s'][variant] * 1e3:.2f}" for r in extra)]
    for dname, chain in results.get("decode_chain", {}).items():
        lines += ["", f"Decode call chain, {dname}, one token after the flush (ms, medians; "
                  f"{chain['weight_bytes_hit'] / 1e6:.1f} MB of hit weights): "
                  + ", ".join(f"{name} {ms:.3f}" + (f" ({chain['weight_bytes_hit'] / ms / 1e6:.1f} GB/s)"
                                                     if name == "native kernel alone" else "")
                              for name, ms in chain["ms"].items())]
    lines += ["", "Targets: prefill (T=2048, bf16) >= 50% of dense and >= 3x eager; decode (T=1) >= 50% of copy "
              "bandwidth on the hit experts' bytes; never slower than the best transformers implementation."]
    (out / "moe_cpu.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written")
        return
    fig, axes = plt.subplots(1, len(results["dtypes"]), figsize=(6 * len(results["dtypes"]), 4), squeeze=False)
    for ax, dt in zip(axes[0], results["dtypes"]):
        rows = [r for r in results["rows"] if r["dtype"] == dt]
        for impl in ("eager", "grouped_mm", "dsv41_cpu_grouped"):
            ax.plot([r["tokens"] for r in rows], [r["time_s"][impl] * 1e3 for r in rows], marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms per experts call")
        ax.set_title(f"{dt}: scaled V4-Flash experts (H {H}, E {E}, k {K}, I {I})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "moe_cpu.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4, help="layers of weights rotated between calls")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 is steadier on a shared, oversubscribed machine")
    parser.add_argument("--variants", action="store_true", help="also time our per-expert mm loop variant")
    parser.add_argument("--chain", action="store_true",
                        help="also time each layer of the one-token call chain (kernel, dispatch, module, no-op floor)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = copy_rate()
    print(f"memory copy: {bw / 1e9:.1f} GB/s (read + write), torch threads: {torch.get_num_threads()}")
    impls = ["eager", "grouped_mm", "dsv41_cpu_grouped"] + (["ours_loop", "ours_no_native"] if args.variants else [])
    rows = []
    chains = {}
    rotation_mib = 0.0
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        config, layers, router = make_layers(args.layers, dtype)
        rotation_mib = sum(p.numel() * p.element_size() for ex in layers for p in ex.parameters()) / 2**20
        for tokens in args.tokens:
            dense = dense_rate(max(tokens * K, 1), dtype, max(3, args.repeats))
            case_bw = copy_rate(repeats=7)  # the bandwidth limit, re-measured next to every case
            bw = max(bw, case_bw)
            case = bench_case(config, layers, router, dtype, tokens, impls,
                              args.repeats * (3 if tokens <= 16 else 1), seed=1)
            case["dtype"] = dname
            case["summary"] = summarize(case, dense, case_bw)
            rows.append(case)
            t, s = case["time_s"], case["summary"]
            print(
                f"{dname} T={tokens:5d} hit={case['experts_hit']:2d} | "
                + " ".join(f"{n}={v * 1e3:.2f}ms" for n, v in t.items())
                + f" | ours {s['ours_gflops']:.0f} GFLOP/s = {s['pct_of_dense']:.0f}% of dense {s['dense_gflops']:.0f}"
                f" | {s['ours_gbps']:.1f} GB/s = {s['pct_of_bandwidth']:.0f}% of copy {s['copy_gbps']:.1f}"
                f" | x{s['speedup_vs_eager']:.2f} eager, x{s['speedup_vs_grouped_mm']:.2f} grouped_mm",
                flush=True,
            )
        if args.chain:
            chains[dname] = decode_chain(config, layers, router, dtype, repeats=max(15, 6 * args.repeats))
            print(f"{dname} decode chain (ms): " + ", ".join(f"{n} {v:.3f}" for n, v in chains[dname]["ms"].items()),
                  flush=True)
        del layers
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "copy_gbps": bw / 1e9,
        "layers": args.layers,
        "rotation_mib": rotation_mib,
        "repeats": args.repeats,
        "dtypes": args.dtypes,
        "rows": rows,
        **({"decode_chain": chains} if chains else {}),
    }
    write_outputs(results, args.out)
    print(f"wrote {args.out / 'moe_cpu.json'}, moe_cpu.md, moe_cpu.png")


if __name__ == "__main__":
    main()
