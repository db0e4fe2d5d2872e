"""Plain-text corpora -> byte-level BPE tokenizer -> packed train/validation token blocks."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>"]

# A compact chat format for the tiny model; generation stops at <|end_of_turn|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end_of_turn|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def read_text(path: Path) -> str:
    """Read a text file; Project Gutenberg files are cut to the text between the START/END markers."""
    text = Path(path).read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    start = re.search(r"\*\*\* START OF (THE|THIS) PROJECT GUTENBERG.*?\*\*\*\n", text)
    end = re.search(r"\*\*\* END OF (THE|THIS) PROJECT GUTENBERG", text)
    if start and end:
        text = text[start.end() : end.start()]
    if not text.strip():
        raise ValueError(f"{path}: no text to train on")
    return text


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Hold out the last ``val_fraction`` of each file (by characters, at a line boundary)."""
    cut = int(len(text) * (1 - val_fraction))
    cut = text.rfind("\n", 0, cut) + 1 or cut
    return text[:cut], text[cut:]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def pack(token_ids: list[int], block: int) -> torch.Tensor:
    """Pack a token stream into [n, block + 1] rows (inputs and shifted labels share a row)."""
    n = (len(token_ids) - 1) // block
    if n < 1:
        raise ValueError(f"not enough tokens ({len(token_ids)}) for one block of {block}")
    data = torch.tensor(token_ids[: n * block + 1], dtype=torch.long)
    return torch.stack([data[i * block : (i + 1) * block + 1] for i in range(n)])


def encode_corpus(tokenizer, texts: list[str]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return ids


def unigram_cross_entropy(train_ids: list[int], val_ids: list[int], vocab_size: int) -> float:
    """Cross-entropy (nats/token) on validation of an add-one-smoothed unigram model fit on train."""
    counts = torch.bincount(torch.tensor(train_ids), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[torch.tensor(val_ids)].mean())


def perplexity(cross_entropy: float) -> float:
    return math.exp(cross_entropy)
