"""Measured throughput and peak memory of a checkpoint on this machine.

Each model is measured in its own subprocess (``python -m dsv41.evals.measure PATH ...``) so that
the peak resident memory (CPU: ``ru_maxrss`` of that process; CUDA: ``max_memory_allocated``)
belongs to that model alone. Inputs are random token ids of a fixed seed, so two models see the
same prompt length and decode length. Prefill: one forward over the prompt; decode: greedy
steps with the KV cache, one token at a time (batch 1), timed after one warm-up step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def available_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def can_run(spec: str, total_params: int, device: str, bytes_per_param: float = 2.0) -> tuple[bool, str]:
    """Whether ``spec`` is a checkpoint on disk whose weights fit in this machine's free memory."""
    path = Path(spec).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False, f"{spec!r} is not a local checkpoint directory (built-in configs have no weights)"
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        return False, f"{path} has a config.json but no weight files"
    need = total_params * bytes_per_param * 1.2
    have = available_memory_bytes(device)
    if need > have:
        return False, f"{path.name} needs ~{need / 2**30:.1f} GiB on {device}, {have / 2**30:.1f} GiB free"
    return True, ""


def measure_in_subprocess(spec: str, name: str, prompt_tokens: int, new_tokens: int, device: str,
                          dtype: str = "auto", timeout: float = 1800) -> dict:
    cmd = [sys.executable, "-m", "dsv41.evals.measure", spec, "--prompt-tokens", str(prompt_tokens),
           "--new-tokens", str(new_tokens), "--device", device, "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        return {"name": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["name"] = name
    return out


def _current_rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _measure(spec: str, prompt_tokens: int, new_tokens: int, device: str, dtype: str) -> dict:
    import resource

    import torch

    from .lm_model import _model_type, load_dsv41_model

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    rss_before = _current_rss()
    if _model_type(spec) == "deepseek_v4":
        model = load_dsv41_model(spec, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    model = model.to(device).eval()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    model(input_ids=ids[:, : min(8, prompt_tokens)], use_cache=False)  # warm-up
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    sync()
    prefill_s = time.perf_counter() - t0
    cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    mask = torch.ones(1, prompt_tokens + 1, dtype=torch.long, device=device)
    out = model(input_ids=nxt, past_key_values=cache, attention_mask=mask, use_cache=True)  # warm-up step
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    t0 = time.perf_counter()
    for i in range(new_tokens):
        mask = torch.ones(1, prompt_tokens + 2 + i, dtype=torch.long, device=device)
        out = model(input_ids=nxt, past_key_values=cache, attention_mask=mask, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync()
    decode_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        peak, kind = torch.cuda.max_memory_allocated(), "CUDA max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    return {
        "device": device, "dtype": str(next(model.parameters()).dtype), "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "prefill_seconds": prefill_s, "decode_seconds": decode_s,
        "prefill_tokens_per_s": prompt_tokens / prefill_s, "decode_tokens_per_s": new_tokens / decode_s,
        "peak_memory_bytes": int(peak), "peak_memory_kind": kind, "rss_before_load_bytes": rss_before, "torch_threads": torch.get_num_threads(),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args(argv)
    print(json.dumps(_measure(a.model, a.prompt_tokens, a.new_tokens, a.device, a.dtype)))


if __name__ == "__main__":
    main()
