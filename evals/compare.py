"""``dsv41 compare``: the same lm-eval tasks, shots, seeds, limits and prompts for two models, a
side-by-side report (JSON, Markdown, bar chart with 95 % CIs), a paired significance test per
task, published baseline numbers kept apart and labelled, and the efficiency comparison.

Statistics (per task, on the task's primary metric, one value per evaluated document):

* score and 95 % CI: mean with a percentile bootstrap over documents (``bootstrap_iters``
  resamples, seeded); lm-eval's own stderr is kept in the JSON too;
* paired difference model − baseline over the documents both models saw, with a paired
  bootstrap 95 % CI;
* p-value: exact McNemar test (two-sided binomial on the discordant pairs) for 0/1 metrics,
  paired sign-flip permutation test for continuous ones (TruthfulQA MC2). Exact over all sign
  patterns when there are at most 16 non-zero differences, else 20 000 random flips.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import reasoning
from .published import HUB_IDS, published_for

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# task -> (family used for data / published numbers, loader, primary metric, 0/1 metric?)
TASK_INFO: dict[str, dict] = {
    "dsv41_arc_challenge": {"family": "arc_challenge", "loader": reasoning.load_arc_challenge, "metric": "acc_norm", "binary": True},
    "dsv41_arc_easy": {"family": "arc_easy", "loader": reasoning.load_arc_easy, "metric": "acc_norm", "binary": True},
    "dsv41_gsm8k": {"family": "gsm8k", "loader": reasoning.load_gsm8k, "metric": "exact_match", "binary": True},
    "dsv41_hellaswag": {"family": "hellaswag", "loader": reasoning.load_hellaswag, "metric": "acc_norm", "binary": True},
    "dsv41_mmlu": {"family": "mmlu", "loader": reasoning.load_mmlu, "metric": "acc", "binary": True},
    "dsv41_truthfulqa_mc1": {"family": "truthfulqa_mc1", "loader": reasoning.load_truthfulqa, "metric": "acc", "binary": True},
    "dsv41_truthfulqa_mc2": {"family": "truthfulqa_mc2", "loader": reasoning.load_truthfulqa, "metric": "acc", "binary": False},
}
SUITES = {"reasoning": list(TASK_INFO)}


class CompareError(RuntimeError):
    pass


def resolve_tasks(suite: str) -> list[str]:
    """A suite name or a comma-separated list of task names (with or without the ``dsv41_`` prefix)."""
    out: list[str] = []
    for item in [s.strip() for s in suite.split(",") if s.strip()]:
        if item in SUITES:
            out += SUITES[item]
            continue
        name = item if item.startswith("dsv41_") else f"dsv41_{item}"
        if name not in TASK_INFO:
            raise CompareError(f"unknown suite or task {item!r}; suites: {', '.join(SUITES)}; tasks: "
                               f"{', '.join(t.removeprefix('dsv41_') for t in TASK_INFO)}")
        out.append(name)
    return list(dict.fromkeys(out))


def check_data(tasks: list[str], data_dir: str | None) -> dict[str, str]:
    """Load every task's data once; returns {task: error message} for the tasks whose data is missing."""
    missing = {}
    for task in tasks:
        try:
            TASK_INFO[task]["loader"](data_dir=data_dir)
        except reasoning.MissingDataError as exc:
            missing[task] = str(exc).replace(f"task {exc.task!r}", f"task {task!r}", 1)
    return missing


@dataclass
class CompareOptions:
    model: str
    baseline: str
    suite: str = "reasoning"
    out: str = "compare-report"
    data_dir: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None  # None: each task's default shots
    seed: int = 1234
    batch_size: int = 8
    device: str | None = None
    dtype: str = "auto"
    max_gen_toks: int | None = None
    bootstrap_iters: int = 2000
    skip_missing: bool = False
    measure_speed: bool = True
    speed_prompt_tokens: int = 256
    speed_new_tokens: int = 32
    moe_backend: str = "auto"
    quantization: str = "auto"
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def bootstrap_ci(values: np.ndarray, iters: int, rng: np.random.Generator, alpha: float = 0.05) -> tuple[float, float]:
    if len(values) == 0:
        return (math.nan, math.nan)
    idx = rng.integers(0, len(values), size=(iters, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict:
    from scipy.stats import binomtest

    only_a = int(((a == 1) & (b == 0)).sum())
    only_b = int(((a == 0) & (b == 1)).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(only_a, n, 0.5, alternative="two-sided").pvalue)
    return {"test": "exact McNemar", "p_value": p, "model_only_correct": only_a, "baseline_only_correct": only_b}


def sign_flip_test(diff: np.ndarray, rng: np.random.Generator, n_random: int = 20000) -> dict:
    d = diff[diff != 0]
    if len(d) == 0:
        return {"test": "paired sign-flip permutation", "p_value": 1.0, "exact": True}
    observed = abs(d.mean())
    if len(d) <= 16:
        signs = ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1) * 2 - 1
        exact = True
    else:
        signs = rng.choice([-1, 1], size=(n_random, len(d)))
        exact = False
    stats = np.abs((signs * d).mean(axis=1))
    p = float((stats >= observed - 1e-12).mean())
    return {"test": "paired sign-flip permutation", "p_value": p, "exact": exact}


def flat_results(per_task: dict, model_name: str, baseline_name: str, baseline_measured: bool) -> list[dict]:
    """One row per (task, model) score, each labelled *measured* or *published* (with its source),
    the flat form that model cards and leaderboards read."""
    rows = []
    for task, stats in per_task.items():
        for who, name in (("model", model_name), ("baseline", baseline_name)):
            if who == "baseline" and not baseline_measured:
                continue
            rows.append({"task": task, "metric": stats["metric"], "model": name, "value": stats[who]["score"],
                         "ci95": stats[who]["ci95"], "num_fewshot": stats.get("num_fewshot"), "kind": "measured",
                         "source": "this comparison (compare.json)"})
        for entry in stats.get("published_baseline", []):
            rows.append({"task": task, "metric": entry["metric"], "model": f"{baseline_name} ({entry['variant']})",
                         "value": entry["score"] / 100.0, "num_fewshot": entry["shots"], "kind": "published",
                         "source": entry["source"]})
    return rows


def task_statistics(task: str, samples_a: list[dict], samples_b: list[dict] | None, iters: int, seed: int) -> dict:
    info = TASK_INFO[task]
    metric = info["metric"]
    rng = np.random.default_rng(seed)

    def values(samples):
        return {s["doc_id"]: float(s[metric]) for s in samples}

    va = values(samples_a)
    xa = np.array(list(va.values()))
    out = {"metric": metric, "n": len(xa), "model": {"score": float(xa.mean()) if len(xa) else math.nan,
                                                      "ci95": bootstrap_ci(xa, iters, rng)}}
    if samples_b is not None:
        vb = values(samples_b)
        xb = np.array(list(vb.values()))
        out["baseline"] = {"score": float(xb.mean()) if len(xb) else math.nan, "ci95": bootstrap_ci(xb, iters, rng)}
        common = sorted(set(va) & set(vb))
        pa, pb = np.array([va[i] for i in common]), np.array([vb[i] for i in common])
        diff = pa - pb
        test = mcnemar_exact(pa, pb) if info["binary"] else sign_flip_test(diff, rng)
        out["paired"] = {"n_pairs": len(common), "mean_diff_model_minus_baseline": float(diff.mean()) if len(diff) else math.nan,
                         "diff_ci95": bootstrap_ci(diff, iters, rng), **test}
    return out


# --------------------------------------------------------------------------------------------
# Running lm-eval
# --------------------------------------------------------------------------------------------


def _is_v4(spec: str) -> bool:
    from .lm_model import _model_type

    return _model_type(spec) == "deepseek_v4"


def run_model(spec: str, tasks: list[str], opts: CompareOptions) -> dict:
    """One lm-eval run with the comparison's fixed settings; returns lm-eval's result dict."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from . import lm_model  # noqa: F401 - registers the "dsv41" lm-eval model

    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_args = {"pretrained": spec, "dtype": opts.dtype, "device": device}
    if _is_v4(spec):
        backend = "dsv41"
        model_args.update(moe_backend=opts.moe_backend, quantization=opts.quantization)
    else:
        backend = "hf"
        model_args["trust_remote_code"] = Path(spec).is_dir()
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": opts.data_dir})
    gen_kwargs = {"max_gen_toks": opts.max_gen_toks} if opts.max_gen_toks else None
    res = lm_eval.simple_evaluate(
        model=backend, model_args=model_args, tasks=tasks, num_fewshot=opts.num_fewshot, limit=opts.limit,
        task_manager=tm, log_samples=True, bootstrap_iters=min(opts.bootstrap_iters, 1000),
        random_seed=opts.seed, numpy_random_seed=opts.seed, torch_random_seed=opts.seed,
        fewshot_random_seed=opts.seed, gen_kwargs=gen_kwargs, batch_size=opts.batch_size,
    )
    res["_backend"] = backend
    res["_model_args"] = {k: str(v) for k, v in model_args.items()}
    return res


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _write_samples(out: Path, label: str, res: dict) -> dict[str, str]:
    paths = {}
    folder = out / "samples" / label
    folder.mkdir(parents=True, exist_ok=True)
    for task, samples in res.get("samples", {}).items():
        path = folder / f"{task}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(_jsonable(s), ensure_ascii=False) + "\n" for s in samples)
        paths[task] = str(path.relative_to(out))
    return paths


def _baseline_plan(baseline: str, device: str) -> dict:
    """How the baseline is obtained: measured (a checkpoint / Hub id we can run) or published only."""
    key = baseline.lower()
    if key in HUB_IDS:
        hub_id = HUB_IDS[key]
        try:
            import torch
            from huggingface_hub import snapshot_download

            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA GPU on this machine (a 70B model needs ~140 GB of GPU memory in bf16)")
            local = snapshot_download(hub_id, local_files_only=True)
            return {"kind": "builtin-measured", "spec": local, "name": key, "published": published_for(key),
                    "note": f"measured from {hub_id} (local snapshot {local})"}
        except Exception as exc:  # noqa: BLE001 - any reason means: not measurable here
            return {"kind": "builtin-published", "spec": None, "name": key, "published": published_for(key),
                    "note": f"not measured ({type(exc).__name__}: {exc}); only published numbers are shown"}
    return {"kind": "measured", "spec": baseline, "name": Path(baseline).name or baseline, "published": {},
            "note": "measured in this run"}


def _efficiency(opts: CompareOptions, model_spec: str, baseline_spec: str | None, baseline_name: str,
                device: str) -> dict:
    from .efficiency import (
        ConfigError,
        compare_efficiency,
        efficiency_markdown,
        load_arch,
    )
    from .measure import can_run, measure_in_subprocess

    eff_baseline = baseline_name if baseline_name in HUB_IDS else baseline_spec
    try:
        result = compare_efficiency(model_spec, eff_baseline)
    except ConfigError as exc:
        return {"error": str(exc), "markdown": f"Efficiency not computed: {exc}\n"}
    measured = None
    if opts.measure_speed:
        checks = {}
        for key, spec in (("model", model_spec), ("baseline", baseline_spec)):
            if spec is None:
                checks[key] = (False, "the baseline is a built-in config without local weights")
                continue
            checks[key] = can_run(spec, load_arch(spec).total_params(), device)
        if all(ok for ok, _ in checks.values()):
            measured = {key: measure_in_subprocess(spec, name, opts.speed_prompt_tokens, opts.speed_new_tokens, device)
                        for key, spec, name in (("model", model_spec, Path(model_spec).name),
                                                ("baseline", baseline_spec, baseline_name))}
        else:
            measured = {"skipped": "; ".join(f"{k}: {why}" for k, (ok, why) in checks.items() if not ok)}
    result["measured"] = measured
    result["markdown"] = efficiency_markdown(result, measured)
    return result


def run_compare(opts: CompareOptions) -> dict:
    """Run both models and write compare.json, compare.md, compare.png and samples/ under ``opts.out``."""
    import lm_eval
    import torch

    tasks = resolve_tasks(opts.suite)
    missing = check_data(tasks, opts.data_dir)
    if missing and not opts.skip_missing:
        raise CompareError("data missing for " + ", ".join(missing) + ":\n" + "\n".join(missing.values())
                           + "\n(pass --skip-missing to compare on the other tasks)")
    run_tasks = [t for t in tasks if t not in missing]
    if not run_tasks:
        raise CompareError("no task has data:\n" + "\n".join(missing.values()))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = _baseline_plan(opts.baseline, device)
    model_name = Path(opts.model).name or opts.model

    res_a = run_model(opts.model, run_tasks, opts)
    res_b = run_model(plan["spec"], run_tasks, opts) if plan["spec"] else None

    files = {"json": "compare.json", "markdown": "compare.md", "chart": "compare.png", "samples": {}, "lm_eval": {}}
    files["samples"]["model"] = _write_samples(out, "model", res_a)
    if res_b is not None:
        files["samples"]["baseline"] = _write_samples(out, "baseline", res_b)
    (out / "lm_eval").mkdir(exist_ok=True)
    for label, res in (("model", res_a), ("baseline", res_b)):
        if res is not None:
            path = out / "lm_eval" / f"{label}.json"
            path.write_text(json.dumps(_jsonable({k: v for k, v in res.items() if k != "samples"}), indent=1))
            files["lm_eval"][label] = str(path.relative_to(out))

    per_task = {}
    for task in run_tasks:
        sa = res_a["samples"][task]
        sb = res_b["samples"][task] if res_b is not None else None
        stats = task_statistics(task, sa, sb, opts.bootstrap_iters, opts.seed)
        stats["num_fewshot"] = res_a["n-shot"].get(task)
        stats["lm_eval_stderr"] = {"model": res_a["results"][task].get(f"{stats['metric']}_stderr,none")}
        if res_b is not None:
            if res_b["n-shot"].get(task) != stats["num_fewshot"]:
                raise CompareError(f"{task}: shots differ between the runs ({stats['num_fewshot']} vs {res_b['n-shot'].get(task)})")
            stats["lm_eval_stderr"]["baseline"] = res_b["results"][task].get(f"{stats['metric']}_stderr,none")
            ha = {s["doc_id"]: s["prompt_hash"] for s in sa}
            hb = {s["doc_id"]: s["prompt_hash"] for s in sb}
            stats["identical_prompts"] = ha == hb
            if not stats["identical_prompts"]:
                raise CompareError(f"{task}: the two runs built different prompts (prompt_hash mismatch)")
        stats["data"] = reasoning.DATA_PROVENANCE.get(TASK_INFO[task]["family"].split("_mc")[0])
        stats["published_baseline"] = plan["published"].get(TASK_INFO[task]["family"], [])
        per_task[task] = stats

    eff = _efficiency(opts, opts.model, plan["spec"], plan["name"], device)
    report = {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {"name": model_name, "spec": opts.model, "kind": "measured", "backend": res_a["_backend"],
                  "model_args": res_a["_model_args"]},
        "baseline": {"name": plan["name"], "spec": plan["spec"] or opts.baseline, "kind": plan["kind"], "note": plan["note"],
                     "backend": res_b["_backend"] if res_b else None, "model_args": res_b["_model_args"] if res_b else None},
        "settings": {"tasks": run_tasks, "skipped_missing_data": missing, "limit": opts.limit,
                     "num_fewshot_override": opts.num_fewshot, "seed": opts.seed, "batch_size": opts.batch_size,
                     "max_gen_toks": opts.max_gen_toks, "bootstrap_iters": opts.bootstrap_iters, "device": device,
                     "dtype": opts.dtype, "data_dir": opts.data_dir, "lm_eval_version": lm_eval.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
        "labels": {"measured": "run in this comparison, identical tasks/shots/seeds/limits/prompts for both models",
                   "published": "stated by the model owner or a named third party under their own settings; not comparable "
                                "to measured numbers without caveats"},
        "tasks": per_task,
        "results": flat_results(per_task, model_name, plan["name"], res_b is not None),
        "efficiency": {k: v for k, v in eff.items() if k != "markdown"},
        "files": files,
        "statistics": __doc__,
    }
    (out / "compare.json").write_text(json.dumps(_jsonable(report), indent=1))
    (out / "compare.md").write_text(render_markdown(report, eff.get("markdown", "")))
    render_chart(report, out / "compare.png")
    return report


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def render_markdown(report: dict, efficiency_md: str) -> str:
    m, b, st = report["model"], report["baseline"], report["settings"]
    lines = [
        f"# Comparison: {m['name']} vs {b['name']}",
        "",
        f"- model: `{m['spec']}` — *measured* (lm-eval backend `{m['backend']}`)",
        f"- baseline: `{b['spec']}` — {'*measured*' if b['backend'] else '*published only*'}: {b['note']}",
        (f"- tasks: {', '.join(st['tasks'])}; limit {st['limit'] or 'none'}; seed {st['seed']}; "
        f"shots: {'task defaults' if st['num_fewshot_override'] is None else st['num_fewshot_override']}; "
        f"device {st['device']}; lm-eval {st['lm_eval_version']}"),
    ]
    for task, why in st["skipped_missing_data"].items():
        lines.append(f"- **skipped {task}**: {why}")
    lines += [
        "",
        "Scores in %, 95 % bootstrap CIs in brackets. Δ = model − baseline (paired, same documents).",
        "",
        "| task | metric | shots | n | model (*measured*) | baseline (*measured*) | Δ [95 % CI] | test | p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, s in report["tasks"].items():
        ma = s["model"]
        row = f"| {task} | {s['metric']} | {s['num_fewshot']} | {s['n']} | {_pct(ma['score'])} [{_pct(ma['ci95'][0])}, {_pct(ma['ci95'][1])}] |"
        if "baseline" in s:
            bb, pr = s["baseline"], s["paired"]
            row += (f" {_pct(bb['score'])} [{_pct(bb['ci95'][0])}, {_pct(bb['ci95'][1])}] |"
                    f" {_pct(pr['mean_diff_model_minus_baseline'])} [{_pct(pr['diff_ci95'][0])}, {_pct(pr['diff_ci95'][1])}] |"
                    f" {pr['test']} | {pr['p_value']:.3g} |")
        else:
            row += " not measured | — | — | — |"
        lines.append(row)
    pub_rows = [(task, p) for task, s in report["tasks"].items() for p in s["published_baseline"]]
    if pub_rows:
        lines += ["", f"## *Published* scores of {b['name']} (not measured here; different settings)", "",
                  "| task | variant | score (*published*) | shots | metric | source |", "|---|---|---|---|---|---|"]
        for task, p in pub_rows:
            tag = " (third-party)" if p.get("third_party") else ""
            lines.append(f"| {task} | {p['variant']}{tag} | {p['score']:.1f} | {p['shots']} | {p['metric']} | {p['source']} |")
    lines += ["", ("Per-sample outputs: `samples/<model|baseline>/<task>.jsonl` (lm-eval `log_samples` records, with "
              "`doc_hash` / `prompt_hash`); raw lm-eval results: `lm_eval/`."), "", efficiency_md]
    return "\n".join(lines) + "\n"


def render_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    series = [("model", f"{report['model']['name']} (measured)", "#1f77b4", None)]
    if any("baseline" in s for s in report["tasks"].values()):
        series.append(("baseline", f"{report['baseline']['name']} (measured)", "#ff7f0e", None))
    pub_variants = sorted({(p["variant"], bool(p.get("third_party"))) for s in report["tasks"].values()
                           for p in s["published_baseline"]})
    width = 0.8 / (len(series) + len(pub_variants))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4.5))
    x = np.arange(len(tasks))
    for i, (key, label, color, _) in enumerate(series):
        vals, lo, hi = [], [], []
        for t in tasks:
            s = report["tasks"][t].get(key)
            score = s["score"] if s else math.nan
            vals.append(100 * score)
            lo.append(100 * (score - s["ci95"][0]) if s else 0)
            hi.append(100 * (s["ci95"][1] - score) if s else 0)
        ax.bar(x + i * width, vals, width, yerr=[lo, hi], capsize=3, label=label + " ±95% CI", color=color)
    hatches = ["//", "xx", "..", "\\\\"]
    for j, (variant, third) in enumerate(pub_variants):
        vals = []
        for t in tasks:
            match = [p for p in report["tasks"][t]["published_baseline"]
                     if p["variant"] == variant and bool(p.get("third_party")) == third]
            vals.append(match[0]["score"] if match else math.nan)
        label = f"{report['baseline']['name']} {variant} (PUBLISHED{', third-party' if third else ''})"
        ax.bar(x + (len(series) + j) * width, vals, width, label=label, color="white", edgecolor="gray",
               hatch=hatches[j % len(hatches)])
    ax.set_xticks(x + width * (len(series) + len(pub_variants) - 1) / 2)
    ax.set_xticklabels([t.removeprefix("dsv41_") for t in tasks], rotation=20, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report['model']['name']} vs {report['baseline']['name']} — measured ±95% CI; hatched = published")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
