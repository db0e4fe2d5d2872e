"""Published scores of the built-in baselines, each with its shot count, metric and source.

These are *published* numbers (stated by the model owner, or by a named third party where the
owner published none). They come from evaluation settings that differ from ours (prompt format,
metric — e.g. Meta's ARC-Challenge uses the MMLU-style letter setup — and the exact data
revision), so reports always label them *published* and never put them in the *measured* columns.
"""

from __future__ import annotations

LLAMA3_CARD = "https://github.com/meta-llama/llama-models/blob/main/models/llama3/MODEL_CARD.md"
LLAMA31_CARD = "https://github.com/meta-llama/llama-models/blob/main/models/llama3_1/MODEL_CARD.md"
LLM360 = "https://www.llm360.ai/evaluation.html (third-party, Open-LLM-Leaderboard-v1-style settings)"

# task family -> list of published entries
PUBLISHED: dict[str, dict[str, list[dict]]] = {
    "llama-3-70b": {
        "arc_challenge": [
            {"variant": "base", "score": 93.0, "shots": 25, "metric": "acc (Meta setup)", "source": LLAMA3_CARD},
            {"variant": "instruct", "score": 94.4, "shots": 0, "metric": "acc", "source": LLAMA31_CARD + " (Llama 3 70B Instruct column)"},
            {"variant": "base", "score": 69.8, "shots": 25, "metric": "acc_norm", "source": LLM360, "third_party": True},
        ],
        "mmlu": [
            {"variant": "base", "score": 79.5, "shots": 5, "metric": "macro_avg/acc_char", "source": LLAMA3_CARD},
            {"variant": "instruct", "score": 82.0, "shots": 5, "metric": "macro_avg/acc", "source": LLAMA3_CARD},
            {"variant": "base", "score": 75.0, "shots": 5, "metric": "acc", "source": LLM360, "third_party": True},
        ],
        "gsm8k": [
            {"variant": "instruct", "score": 93.0, "shots": 8, "metric": "em (CoT)", "source": LLAMA3_CARD},
            {"variant": "base", "score": 80.4, "shots": 5, "metric": "em", "source": LLM360, "third_party": True},
        ],
        "hellaswag": [
            {"variant": "base", "score": 87.9, "shots": 10, "metric": "acc_norm", "source": LLM360, "third_party": True},
        ],
        "truthfulqa_mc2": [
            {"variant": "base", "score": 45.6, "shots": 0, "metric": "mc2", "source": LLM360, "third_party": True},
        ],
    },
    "llama-3.1-70b": {
        "arc_challenge": [
            {"variant": "base", "score": 92.9, "shots": 25, "metric": "acc_char", "source": LLAMA31_CARD},
            {"variant": "instruct", "score": 94.8, "shots": 0, "metric": "acc", "source": LLAMA31_CARD},
        ],
        "mmlu": [
            {"variant": "base", "score": 79.3, "shots": 5, "metric": "macro_avg/acc_char", "source": LLAMA31_CARD},
            {"variant": "instruct", "score": 83.6, "shots": 5, "metric": "macro_avg/acc", "source": LLAMA31_CARD},
        ],
        "gsm8k": [
            {"variant": "instruct", "score": 95.1, "shots": 8, "metric": "em_maj1@1 (CoT)", "source": LLAMA31_CARD},
        ],
    },
}

# Hub ids used when a built-in baseline can be measured (GPU + weights available).
HUB_IDS = {"llama-3-70b": "meta-llama/Meta-Llama-3-70B", "llama-3.1-70b": "meta-llama/Llama-3.1-70B"}


def published_for(baseline: str) -> dict[str, list[dict]]:
    return PUBLISHED.get(baseline.lower(), {})
