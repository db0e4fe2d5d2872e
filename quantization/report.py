"""Quality report: each quantization method against the bf16 model on held-out text.

Metrics per method (next-token distributions over the held-out tokens, windows of ``seq_len``):
mean KL(bf16 || quantized), top-1 agreement with a 95% Wilson interval, perplexity and its
relative change (with a paired standard error), checkpoint bytes and the ratio to the bf16 size,
and the peak resident memory (VmHWM, reset before each method) while loading and running the
model on CPU. Quantized checkpoints are loaded by dequantizing to bf16 (the CPU path), so the
memory column measures that path; bitsandbytes methods keep their weights quantized in memory.
Outputs: ``report.json``, ``report.md`` and ``report.png`` in the output folder.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import torch

from .checkpoint import QuantSpec, quantize_checkpoint
from .codecs import QuantizationError
from .names import is_quantizable_linear, is_routed_expert
from .safetensors_io import Checkpoint

REPORT_METHODS = ("fp8", "mxfp4", "int8", "int4-rtn", "int4-gptq")
BNB_METHODS = ("bnb-nf4", "bnb-int8")


# ----------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


# ----------------------------------------------------------------------------- sizes / defaults


def bf16_equivalent_bytes(path: str | Path) -> int:
    """Size of the checkpoint with every floating tensor in bf16 (other tensors as stored)."""
    ck = Checkpoint(path)
    return sum(i.numel * 2 if i.dtype.is_floating_point else i.nbytes for i in ck.tensors.values())


def bf16_storage_bytes(path: str | Path) -> int:
    """Bytes of a (quantized) checkpoint with every non-quantized floating tensor counted as bf16
    (wider floats at 2 bytes; 1-byte FP8/FP4/int payloads and ue8m0 scales as stored), so that
    an fp32 source checkpoint is compared with its bf16 form on equal terms."""
    ck = Checkpoint(path)
    return sum(i.numel * 2 if i.dtype.is_floating_point and i.dtype.itemsize >= 2 else i.nbytes for i in ck.tensors.values())


def checkpoint_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def auto_block(path: str | Path, method: str) -> dict:
    """Largest FP8 block / int group that divides every tensor the method quantizes."""
    ck = Checkpoint(path)
    shapes = [
        i.shape for n, i in ck.tensors.items() if is_quantizable_linear(n, i.shape) or (is_routed_expert(n) and len(i.shape) in (2, 3))
    ]
    if method == "fp8":
        for b in (128, 64, 32, 16):
            if all(s[-1] % b == 0 and s[-2] % b == 0 for s in shapes):
                return {"block": (b, b)}
        return {"block": (128, 128), "partial_blocks": True}
    if method in ("int8", "int4-rtn", "int4-gptq"):
        for g in ((128, 64, 32) if method == "int8" else (32, 64, 128)):
            if all(s[-1] % g == 0 for s in shapes):
                return {"group_size": g}
        return {"group_size": -1}
    return {}


# ----------------------------------------------------------------------------- data


def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens + 1]
    n = (len(ids) - 1) // seq_len if len(ids) > seq_len else 0
    if n == 0:
        raise QuantizationError(f"held-out text gives {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def next_token_logprobs(model, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """log-softmax over the vocabulary for positions 0..T-2 of every window: ``[N, T-1, V]`` (fp32)."""
    out = []
    for i in range(0, windows.shape[0], batch):
        logits = model(input_ids=windows[i : i + batch], use_cache=False).logits.float()
        out.append(logits[:, :-1].log_softmax(-1))
    return torch.cat(out)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def compare(base_lp: torch.Tensor, lp: torch.Tensor, targets: torch.Tensor) -> dict:
    """Metrics of ``lp`` against ``base_lp`` (both ``[N, T-1, V]`` log-probs), ``targets [N, T-1]``."""
    kl = (base_lp.exp() * (base_lp - lp)).sum(-1).flatten()
    agree = (base_lp.argmax(-1) == lp.argmax(-1)).flatten()
    nll_b = -base_lp.gather(-1, targets[..., None]).squeeze(-1).flatten()
    nll_q = -lp.gather(-1, targets[..., None]).squeeze(-1).flatten()
    n = nll_q.numel()
    ppl_b, ppl_q = math.exp(float(nll_b.mean())), math.exp(float(nll_q.mean()))
    diff = nll_q - nll_b
    se_diff = float(diff.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    k = int(agree.sum())
    lo, hi = wilson(k, n)
    return {
        "tokens": n,
        "mean_kl": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl.double(), 0.99)) if n > 1 else float(kl.max()),
        "top1_agreement": k / n,
        "top1_ci95": [lo, hi],
        "perplexity": ppl_q,
        "perplexity_se": ppl_q * float(nll_q.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan"),
        "ppl_rel_change": ppl_q / ppl_b - 1.0,
        # exp of the paired mean log-ratio: the relative change's standard error via the delta method
        "ppl_rel_change_se": (ppl_q / ppl_b) * se_diff,
    }


# ----------------------------------------------------------------------------- run


def _model_cls():
    from dsv41.modeling import DeepseekV4ForCausalLM

    return DeepseekV4ForCausalLM


def _load(path: Path, dtype: torch.dtype):
    from .checkpoint import is_quantized_checkpoint
    from .loading import load_quantized_model

    cls = _model_cls()
    if is_quantized_checkpoint(path):
        return load_quantized_model(cls, path, dtype=dtype)
    return cls.from_pretrained(path, dtype=dtype).eval()


def _bnb_config(method: str):
    from transformers import BitsAndBytesConfig

    if method == "bnb-nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def run_quality_report(
    model: str | Path,
    out_dir: str | Path,
    text: str,
    calib_text: str | None = None,
    methods: tuple[str, ...] = REPORT_METHODS,
    seq_len: int = 128,
    max_tokens: int = 4096,
    calib_tokens: int = 4096,
    batch: int = 4,
    log=print,
) -> dict:
    """Quantize ``model`` with each method (into ``out_dir/checkpoints``), evaluate, and write the
    JSON / Markdown / PNG report. ``text`` is the held-out text, ``calib_text`` GPTQ's calibration set."""
    from transformers import AutoTokenizer

    model, out_dir = Path(model), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in methods if m not in REPORT_METHODS + BNB_METHODS]
    if unknown:
        raise QuantizationError(f"report methods: expected any of {REPORT_METHODS + BNB_METHODS}, found {unknown}")
    if "int4-gptq" in methods and not calib_text:
        raise QuantizationError("report method int4-gptq needs a calibration text (calib_text)")
    tok = AutoTokenizer.from_pretrained(model)
    windows = token_windows(tok, text, seq_len, max_tokens)
    targets = windows[:, 1:]
    dtype = torch.bfloat16

    gc.collect()
    reset_peak_rss()
    rss0 = rss_bytes()
    t0 = time.time()
    base = _load(model, dtype)
    base_lp = next_token_logprobs(base, windows, batch)
    base_peak = peak_rss_bytes()
    del base
    gc.collect()
    bf16_bytes = bf16_equivalent_bytes(model)
    ref = compare(base_lp, base_lp, targets)
    rows = [
        {
            "method": "bf16",
            **ref,
            "checkpoint_bytes": bf16_bytes,
            "size_ratio_vs_bf16": 1.0,
            "peak_rss_bytes": base_peak,
            "rss_before_bytes": rss0,
            "seconds": time.time() - t0,
            "settings": {},
        }
    ]
    log(f"bf16: ppl {ref['perplexity']:.3f} over {ref['tokens']} tokens")
    for method in methods:
        t0 = time.time()
        settings: dict = {}
        if method in BNB_METHODS:
            from .bnb import bnb_model_bytes, load_bnb_model

            gc.collect()
            reset_peak_rss()
            rss0 = rss_bytes()
            m = load_bnb_model(_model_cls(), model, _bnb_config(method)).eval()
            lp = next_token_logprobs(m, windows, batch)
            peak = peak_rss_bytes()
            size = bnb_model_bytes(m)
            settings = {"storage": "in-memory bitsandbytes (bytes of the quantized model's weights)"}
            del m
        else:
            qdir = out_dir / "checkpoints" / method
            settings = auto_block(model, method)
            spec_kw = dict(settings)
            if method == "int4-gptq":
                from .gptq import collect_hessians

                calib = token_windows(tok, calib_text, seq_len, calib_tokens)
                cm = _model_cls().from_pretrained(model, dtype=torch.float32).eval()
                spec_kw["hessians"] = collect_hessians(cm, calib.split(batch), bits=4, group_size=settings["group_size"])
                spec_kw["calibration"] = {"windows": int(calib.shape[0]), "seq_len": seq_len}
                settings["calibration_windows"] = int(calib.shape[0])
                del cm
            result = quantize_checkpoint(model, qdir, QuantSpec(method, **spec_kw), overwrite=True)
            settings["gptq_rtn_fallback"] = len(result["gptq_rtn_fallback"]) if method == "int4-gptq" else None
            spec_kw.pop("hessians", None)
            size = bf16_storage_bytes(qdir)
            settings["file_bytes_as_written"] = checkpoint_bytes(qdir)
            gc.collect()
            reset_peak_rss()
            rss0 = rss_bytes()
            m = _load(qdir, dtype)
            lp = next_token_logprobs(m, windows, batch)
            peak = peak_rss_bytes()
            del m
        gc.collect()
        row = compare(base_lp, lp, targets)
        del lp
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items() if v is not None}
        rows.append(
            {
                "method": method,
                **row,
                "checkpoint_bytes": size,
                "size_ratio_vs_bf16": size / bf16_bytes,
                "peak_rss_bytes": peak,
                "rss_before_bytes": rss0,
                "seconds": time.time() - t0,
                "settings": settings,
            }
        )
        log(
            f"{method}: KL {row['mean_kl']:.5f}  top-1 {row['top1_agreement']:.4f}  "
            f"ppl {row['perplexity']:.3f} ({100 * row['ppl_rel_change']:+.2f}%)  size x{size / bf16_bytes:.3f}"
        )
    report = {
        "model": str(model),
        "seq_len": seq_len,
        "eval_windows": int(windows.shape[0]),
        "eval_tokens": int(targets.numel()),
        "device": "cpu",
        "dtype": "bfloat16",
        "peak_rss_resettable": reset_peak_rss(),
        "rows": rows,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown_table(report))
    plot_report(report, out_dir / "report.png")
    return report


def markdown_table(report: dict) -> str:
    head = (
        f"Quantization quality on `{report['model']}` ({report['eval_tokens']} held-out tokens, windows of "
        f"{report['seq_len']}, CPU, bf16 compute)\n\n"
        "| method | mean KL | top-1 agreement (95% CI) | perplexity | ppl change (±SE) | checkpoint bytes | size vs bf16 | peak RSS (+ over pre-load) |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in report["rows"]:
        lo, hi = r["top1_ci95"]
        lines.append(
            f"| {r['method']} | {r['mean_kl']:.5f} | {100 * r['top1_agreement']:.2f}% ({100 * lo:.2f}–{100 * hi:.2f}) | "
            f"{r['perplexity']:.3f} | {100 * r['ppl_rel_change']:+.2f}% (±{100 * r['ppl_rel_change_se']:.2f}) | "
            f"{r['checkpoint_bytes']:,} | {r['size_ratio_vs_bf16']:.3f} | {r['peak_rss_bytes'] / 2**20:.0f} MiB "
            f"(+{max(0, r['peak_rss_bytes'] - r['rss_before_bytes']) / 2**20:.0f}) |"
        )
    return head + "\n".join(lines) + "\n"


def plot_report(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [
        ("mean KL(bf16 || q)", [r["mean_kl"] for r in rows], None),
        ("top-1 agreement", [r["top1_agreement"] for r in rows], [[max(0.0, r["top1_agreement"] - r["top1_ci95"][0]) for r in rows], [max(0.0, r["top1_ci95"][1] - r["top1_agreement"]) for r in rows]]),
        ("perplexity change (%)", [100 * r["ppl_rel_change"] for r in rows], [100 * r["ppl_rel_change_se"] for r in rows]),
        ("checkpoint size vs bf16", [r["size_ratio_vs_bf16"] for r in rows], None),
    ]
    for ax, (title, vals, err) in zip(axes, panels):
        ax.bar(names, vals, yerr=err, color="#4c72b0", capsize=3)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
