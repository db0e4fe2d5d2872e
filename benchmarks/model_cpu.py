"""Prefill and decode throughput on CPU: our DeepseekV4ForCausalLM vs transformers' class on the
same weights and inputs, measured in one run (interleaved, median of repeats). Prints the ratio.

    python benchmarks/model_cpu.py [--dtype bf16|fp32] [--prompt 512] [--new 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from modeling_utils import randomize_  # noqa: E402

from dsv41.modeling import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

# A small but not toy configuration: every layer kind, hash + routed MoE, V4-like ratios.
BENCH_CONFIG = dict(
    vocab_size=8192, hidden_size=512, moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
    head_dim=128, q_lora_rank=256, num_experts_per_tok=4, n_routed_experts=16, o_groups=4, o_lora_rank=128,
    index_n_heads=8, index_head_dim=64, index_topk=32, sliding_window=128, hc_mult=4, hc_sinkhorn_iters=20,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"] * 2,
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe", "moe"], qk_rope_head_dim=32,
    eos_token_id=None, bos_token_id=None,
)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    theirs = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**BENCH_CONFIG)).eval()
    randomize_(theirs)
    ours = DeepseekV4ForCausalLM(DeepseekV4Config(**BENCH_CONFIG)).eval()
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    ids = torch.randint(0, BENCH_CONFIG["vocab_size"], (1, args.prompt))
    results = {}
    with torch.inference_mode():
        for name, model in (("transformers", theirs), ("dsv41", ours)):
            model(ids[:, :64], use_cache=False)  # warm-up
        prefill = {name: [] for name in ("transformers", "dsv41")}
        decode = {name: [] for name in ("transformers", "dsv41")}
        for _ in range(args.repeats):  # interleaved A/B
            for name, model in (("transformers", theirs), ("dsv41", ours)):
                prefill[name].append(timed(lambda: model(ids, use_cache=False), 1))
                start = time.perf_counter()
                model.generate(ids[:, :128], max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
                gen = time.perf_counter() - start
                first = timed(lambda: model(ids[:, :128], use_cache=True), 1)
                decode[name].append(max(gen - first, 1e-9))
        for name in prefill:
            results[name] = {
                "prefill_tokens_per_s": args.prompt / statistics.median(prefill[name]),
                "decode_tokens_per_s": args.new / statistics.median(decode[name]),
            }
    ratio = {k: results["dsv41"][k] / results["transformers"][k] for k in results["dsv41"]}
    report = {"dtype": args.dtype, "prompt_tokens": args.prompt, "new_tokens": args.new, "config": BENCH_CONFIG, "results": results, "ratio_ours_over_transformers": ratio, "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    print(f"{'impl':<14}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, r in results.items():
        print(f"{name:<14}{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>15.2f}")
    print(f"{'ratio':<14}{ratio['prefill_tokens_per_s']:>15.2f}{ratio['decode_tokens_per_s']:>15.2f}  (dsv41 / transformers)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"model_cpu_{args.dtype}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
