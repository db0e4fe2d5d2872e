"""Pretraining recipe for DeepSeek-V4-family models on plain-text files.

Runs unchanged on one CPU, one GPU or many GPUs (``accelerate launch -m dsv41.training.train``):
byte-level BPE tokenizer, packed sequences, AdamW with warmup + cosine decay, gradient clipping,
bf16 or fp32, checkpoint/resume, periodic validation, auxiliary-loss-free expert balancing (the
router's e_score_correction_bias is nudged toward balance every step), loss and expert-load plots.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dsv41.modeling import DeepseekV4Config, DeepseekV4ForCausalLM
from dsv41.modeling.modeling_deepseek_v4 import DeepseekV4HashRouter, DeepseekV4SparseMoeBlock

from .data import encode_corpus, pack, perplexity, read_text, split_text, train_tokenizer, unigram_cross_entropy

# The bundled checkpoint's architecture: every attention kind (sliding, CSA, HCA), hash and
# routed MoE, 8 routed experts (top-2) plus the shared expert.
TINY_ARCH = dict(
    hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
    q_lora_rank=128, num_experts_per_tok=2, n_routed_experts=8, o_groups=2, o_lora_rank=64,
    index_n_heads=4, index_head_dim=32, index_topk=16, sliding_window=64, hc_mult=2, hc_sinkhorn_iters=20,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention", "compressed_sparse_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"], qk_rope_head_dim=16, max_position_embeddings=4096,
    routed_scaling_factor=1.0, compress_rope_theta=40000.0,
)


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    precision: str = "fp32"  # or bf16
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    val_fraction: float = 0.05
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step (DeepSeek-V3 "gamma")
    seed: int = 0
    resume: bool = False
    arch: dict = field(default_factory=lambda: dict(TINY_ARCH))


def expert_balance_step(model, rate: float) -> list[list[int]]:
    """Aux-loss-free balancing: after each step, raise the selection bias of under-loaded experts
    and lower it for over-loaded ones (sign of load - mean). Returns the per-layer loads."""
    loads = []
    for module in model.modules():
        if isinstance(module, DeepseekV4SparseMoeBlock) and module.last_expert_load is not None:
            load = module.last_expert_load.float()
            loads.append(module.last_expert_load.tolist())
            if not isinstance(module.gate, DeepseekV4HashRouter):
                module.gate.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))
    return loads


def imbalance(loads: list[list[int]]) -> list[float]:
    return [max(layer) / (sum(layer) / len(layer)) if sum(layer) else float("nan") for layer in loads]


def plot_curves(log: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in log["train"]]
    axes[0].plot(steps, [r["loss"] for r in log["train"]], label="train", alpha=0.7)
    axes[0].plot([r["step"] for r in log["val"]], [r["loss"] for r in log["val"]], "o-", label="validation")
    axes[0].axhline(log["unigram_val_loss"], color="gray", ls="--", label="unigram baseline (val)")
    axes[0].set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    axes[0].legend()
    for layer in range(len(log["train"][0]["imbalance"])):
        axes[1].plot(steps, [r["imbalance"][layer] for r in log["train"]], label=f"MoE layer {layer}")
    axes[1].axhline(1.0, color="gray", ls="--")
    axes[1].set(xlabel="step", ylabel="max / mean tokens per expert", title="Expert load imbalance")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=120)
    plt.close(fig)
    bias_fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in log["final_bias"].items():
        ax.plot(values, "o-", label=name)
    ax.set(xlabel="expert", ylabel="e_score_correction_bias", title="Balancing bias after training")
    ax.legend()
    bias_fig.tight_layout()
    bias_fig.savefig(out / "expert_bias.png", dpi=120)
    plt.close(bias_fig)


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int, max_batches: int | None = None) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        if max_batches is not None and i // batch_size >= max_batches:
            break
        batch = blocks[i : i + batch_size].to(next(model.parameters()).device)
        out = model(batch[:, :-1], use_cache=False)
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no", project_dir=str(out))
    set_seed(cfg.seed)
    texts = [read_text(Path(p)) for p in cfg.data]
    splits = [split_text(t, cfg.val_fraction) for t in texts]
    tok_dir = out / "tokenizer_work"
    tokenizer = train_tokenizer([s[0] for s in splits], cfg.vocab_size, tok_dir)
    train_ids = encode_corpus(tokenizer, [s[0] for s in splits])
    val_ids = encode_corpus(tokenizer, [s[1] for s in splits])
    train_blocks, val_blocks = pack(train_ids, cfg.seq_len), pack(val_ids, cfg.seq_len)
    unigram = unigram_cross_entropy(train_ids, val_ids, len(tokenizer))

    config = DeepseekV4Config(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **cfg.arch,
    )
    model = DeepseekV4ForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "hc" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "hc" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    lr_floor = cfg.min_lr_ratio

    def lr_lambda(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return lr_floor + (1 - lr_floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train_blocks), generator=generator)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_for_checkpointing(scheduler)
    start_step = 0
    state_dir = out / "train_state"
    if cfg.resume and state_dir.exists():
        accelerator.load_state(str(state_dir))
        start_step = json.loads((state_dir / "step.json").read_text())["step"]
    log = {"train": [], "val": [], "unigram_val_loss": unigram, "config": asdict(cfg)}
    log_path = out / "train_log.json"
    if cfg.resume and log_path.exists():
        log = json.loads(log_path.read_text())
    tokens_per_step = cfg.batch_size * cfg.seq_len * accelerator.num_processes
    started = time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=not accelerator.is_local_main_process, desc="train")
    for step in bar:
        t0 = time.perf_counter()
        idx = order[(torch.arange(cfg.batch_size) + step * cfg.batch_size) % len(order)]
        batch = train_blocks[idx].to(accelerator.device)
        with accelerator.autocast():
            loss = model(batch[:, :-1], labels=batch[:, :-1], use_cache=False).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        loads = expert_balance_step(accelerator.unwrap_model(model), cfg.bias_update_rate)
        tok_s = tokens_per_step / (time.perf_counter() - t0)
        log["train"].append({"step": step + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s, "expert_load": loads, "imbalance": imbalance(loads)})
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_s:.0f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val = evaluate(model, val_blocks, cfg.batch_size, cfg.eval_batches if step + 1 < cfg.steps else None)
            log["val"].append({"step": step + 1, "loss": val, "perplexity": perplexity(val)})
            accelerator.print(f"step {step + 1}: val loss {val:.4f} (ppl {perplexity(val):.1f}; unigram ppl {perplexity(unigram):.1f})")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            accelerator.save_state(str(state_dir))
            (state_dir / "step.json").write_text(json.dumps({"step": step + 1}))
            log_path.write_text(json.dumps(log))
    wall = time.perf_counter() - started + (log.get("wall_time_s", 0) if cfg.resume else 0)

    model = accelerator.unwrap_model(model)
    final_dir = out
    if accelerator.is_main_process:
        model.config.moe_backend = "auto"
        if cfg.precision == "bf16":
            model = model.to(torch.bfloat16)
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end_of_turn|>")], pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=64)
        model.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
        final_loads = log["train"][-1]["expert_load"]
        log["final_bias"] = {
            name: module.e_score_correction_bias.tolist()
            for name, module in model.named_modules()
            if hasattr(module, "e_score_correction_bias")
        }
        total_params = sum(p.numel() for p in model.parameters())
        cfgm = model.config
        per_expert = 3 * cfgm.hidden_size * cfgm.moe_intermediate_size
        active = total_params - cfgm.num_hidden_layers * (cfgm.n_routed_experts - cfgm.num_experts_per_tok) * per_expert
        summary = {
            "total_parameters": total_params,
            "active_parameters_per_token": active,
            "training_tokens": cfg.steps * tokens_per_step,
            "wall_time_s": wall,
            "final_train_loss": sum(r["loss"] for r in log["train"][-20:]) / min(20, len(log["train"])),
            "final_val_loss": log["val"][-1]["loss"],
            "final_val_perplexity": log["val"][-1]["perplexity"],
            "unigram_val_loss": unigram,
            "unigram_val_perplexity": perplexity(unigram),
            "expert_load_imbalance_max_over_mean": imbalance(final_loads),
            "val_tokens": len(val_ids),
            "data": [Path(p).name for p in cfg.data],
        }
        summary["final_train_perplexity"] = perplexity(summary["final_train_loss"])
        # what tests/test_bundled_checkpoint.py holds the shipped model to on a held-out slice
        summary["val_loss_threshold"] = round(min(summary["final_val_loss"] + 0.25, (summary["final_val_loss"] + unigram) / 2), 3)
        log["summary"] = summary
        log["wall_time_s"] = wall
        log_path.write_text(json.dumps(log))
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(log, out)
        from .card import write_model_card

        write_model_card(out, summary, asdict(cfg))
        import shutil

        shutil.rmtree(tok_dir, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
        accelerator.print(json.dumps(summary, indent=2))
        return summary
    return {}


def main(argv=None) -> None:  # `accelerate launch -m dsv41.training.train --data ... --out ...`
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    for name, default in asdict(TrainConfig(data=[], out="")).items():
        if name in ("data", "out", "arch"):
            continue
        kind = type(default)
        if kind is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", action="store_true", default=default)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    args = vars(parser.parse_args(argv))
    train(TrainConfig(**args))


if __name__ == "__main__":
    main()
