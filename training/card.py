"""Model card (README.md with Hub metadata) for a checkpoint trained by the recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_model_card(out: Path, summary: dict, train_config: dict) -> Path:
    out = Path(out)
    config = json.loads((out / "config.json").read_text())
    licence = REPO_ROOT / "LICENSE-NONCOMMERCIAL"
    if licence.exists():
        shutil.copyfile(licence, out / "LICENSE-NONCOMMERCIAL")
    layer_kinds = ", ".join(f"{i}: {t}/{m}" for i, (t, m) in enumerate(zip(config["layer_types"], config["mlp_layer_types"])))
    imbalance = ", ".join(f"{x:.2f}" for x in summary["expert_load_imbalance_max_over_mean"])
    card = f"""---
license: other
license_name: dsv41-noncommercial
license_link: LICENSE-NONCOMMERCIAL
library_name: transformers
pipeline_tag: text-generation
tags:
- deepseek_v4
- mixture-of-experts
- tiny
- custom_code
---

# dsv41-tiny

A {summary['total_parameters'] / 1e6:.2f} M-parameter model of the DeepSeek-V4 architecture, trained from
scratch on public-domain English text so that the DeepSeek-V4.1 release kit runs out of the box on a
laptop. It is a *reference and test* model: it writes Shakespeare- and Austen-flavoured text, it
knows nothing, follows no instructions and must not be used for any decision.

- Architecture: `deepseek_v4` ({config['num_hidden_layers']} layers; {layer_kinds}), hidden {config['hidden_size']},
  {config['num_attention_heads']} heads x {config['head_dim']}, hc_mult {config['hc_mult']},
  {config['n_routed_experts']} routed experts (top-{config['num_experts_per_tok']}) + 1 shared expert,
  compress rates {config['compress_rates']}, sliding window {config['sliding_window']}, vocabulary {config['vocab_size']} (byte-level BPE).
- Loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (our classes) or with
  stock transformers >= 5.8 (its `DeepseekV4ForCausalLM`).

## Training

| quantity | value |
|---|---|
| parameters (total) | {summary['total_parameters']:,} |
| parameters active per token | {summary['active_parameters_per_token']:,} |
| training tokens | {summary['training_tokens']:,} |
| wall time | {summary['wall_time_s'] / 60:.1f} min on 2 CPU cores |
| final train loss / perplexity | {summary['final_train_loss']:.3f} / {summary['final_train_perplexity']:.1f} |
| validation loss / perplexity | {summary['final_val_loss']:.3f} / {summary['final_val_perplexity']:.1f} |
| unigram baseline on the same validation split | {summary['unigram_val_loss']:.3f} / {summary['unigram_val_perplexity']:.1f} |
| expert-load imbalance at the end (max/mean, per MoE layer) | {imbalance} |

Data: {', '.join(summary['data'])} (tinyshakespeare; Project Gutenberg #1342 *Pride and Prejudice* and
#1661 *The Adventures of Sherlock Holmes*, public domain; Gutenberg headers and footers removed). The
last {train_config['val_fraction'] * 100:.0f}% of each file is held out for validation
({summary['val_tokens']:,} tokens). Recipe: `dsv41 train` (AdamW, lr {train_config['lr']}, warmup
{train_config['warmup']} then cosine decay, batch {train_config['batch_size']} x {train_config['seq_len']} tokens,
{train_config['steps']} steps, gradient clipping {train_config['grad_clip']}, {train_config['precision']},
seed {train_config['seed']}, auxiliary-loss-free balancing with bias step {train_config['bias_update_rate']}).
Curves: `loss_curve.png`, `expert_bias.png`; the full log is `train_log.json`.

## Chat

The tokenizer carries a small chat template (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|end_of_turn|>`);
the model was not instruction-tuned, so chat output is continuation, not assistance.

## Licence

Weights: `LICENSE-NONCOMMERCIAL` (non-commercial research and audit use, attribution, no warranty).
"""
    path = out / "README.md"
    path.write_text(card)
    return path
