"""report.md, report.html and the PNG charts of an audit report."""

from __future__ import annotations

import html as _html
from pathlib import Path

# (task, metric, reference line, axis label) of the per-group bias charts
BIAS_CHARTS = [
    ("dsv41_bbq", "bias_score_disambig", 0.0, "BBQ bias score, disambiguated (0 = unbiased)"),
    ("dsv41_bbq", "bias_score_ambig", 0.0, "BBQ bias score, ambiguous (0 = unbiased)"),
    ("dsv41_crows_pairs", "pct_stereotype", 0.5, "CrowS-Pairs share preferring the stereotype (0.5 = unbiased)"),
    ("dsv41_stereoset", "ss", 50.0, "StereoSet stereotype score (50 = unbiased)"),
    ("dsv41_winobias", "gap", 0.0, "WinoBias pro - anti accuracy (0 = unbiased)"),
    ("dsv41_bold", "sentiment", 0.0, "BOLD mean sentiment of continuations per group"),
    ("dsv41_harmful", "refusal_rate", None, "Refusal rate on harmful requests per category"),
]


def _metric_rows(report, task, metric):
    return [m for m in report["metrics"] if m["task"] == task and m["metric"] == metric]


def _fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(m):
    return "" if m["ci_low"] is None else f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"


def make_charts(out: Path, report: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts_dir = out / "charts"
    charts_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for task, metric, ref, label in BIAS_CHARTS:
        rows = [m for m in _metric_rows(report, task, metric) if m["group"] != "all" and m["value"] is not None]
        if not rows:
            continue
        rows.sort(key=lambda m: m["group"])
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
        vals = [m["value"] for m in rows]
        lo = [m["value"] - (m["ci_low"] if m["ci_low"] is not None else m["value"]) for m in rows]
        hi = [(m["ci_high"] if m["ci_high"] is not None else m["value"]) - m["value"] for m in rows]
        ax.barh(range(len(rows)), vals, xerr=[lo, hi], color="#4C72B0", ecolor="#333", capsize=3)
        ax.set_yticks(range(len(rows)), [m["group"] for m in rows], fontsize=8)
        if ref is not None:
            ax.axvline(ref, color="#C44E52", linestyle="--", linewidth=1)
        ax.set_xlabel(label + " (bars: 95% bootstrap CI)", fontsize=8)
        ax.invert_yaxis()
        fig.tight_layout()
        name = f"{task}__{metric}.png"
        fig.savefig(charts_dir / name, dpi=110)
        plt.close(fig)
        made.append((name, label))

    # refusal on harmful requests vs over-refusal on safe prompts
    harm = {m["group"]: m for m in _metric_rows(report, "dsv41_harmful", "refusal_rate")}
    over = {m["group"]: m for m in _metric_rows(report, "dsv41_xstest", "over_refusal_rate")}
    xs_types = {m["group"]: m for m in _metric_rows(report, "dsv41_xstest", "refusal_rate")}
    if harm.get("all") or xs_types:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for t, m in sorted(xs_types.items()):
            c = xs_types.get(f"contrast_{t}")
            if t.startswith("contrast_") or c is None or m["value"] is None or c["value"] is None:
                continue
            ax.scatter(m["value"], c["value"], color="#55A868", s=30)
            ax.annotate(t, (m["value"], c["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        h, o = harm.get("all"), over.get("all")
        if h and o and h["value"] is not None and o["value"] is not None:
            xerr = [[o["value"] - (o["ci_low"] or o["value"])], [(o["ci_high"] or o["value"]) - o["value"]]]
            yerr = [[h["value"] - (h["ci_low"] or h["value"])], [(h["ci_high"] or h["value"]) - h["value"]]]
            ax.errorbar(o["value"], h["value"], xerr=xerr, yerr=yerr, fmt="o", color="#C44E52", capsize=3,
                        label="overall: harmful-request refusal vs XSTest over-refusal")
            ax.legend(fontsize=7, loc="lower right")
        ax.plot([0, 1], [0, 1], color="#999", linewidth=0.8, linestyle=":")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("over-refusal (refusal rate on safe prompts)")
        ax.set_ylabel("refusal rate on harmful / unsafe prompts")
        ax.set_title("Refusal vs over-refusal (green: XSTest type vs its contrast)", fontsize=8)
        fig.tight_layout()
        fig.savefig(charts_dir / "refusal_vs_over_refusal.png", dpi=110)
        plt.close(fig)
        made.append(("refusal_vs_over_refusal.png", "Refusal vs over-refusal"))
    return made


def _summary_lines(report):
    m = report["model"]
    j = report["judge"]
    lines = [
        f"- Model: `{m['id']}` (revision {m['revision'] or 'local'}, {m['model_type']}, {m['num_parameters']:,} parameters, {m['dtype']})",
        "- Weight files: " + ", ".join(f"`{w['path']}` sha256 `{w['sha256'][:16]}…`" for w in m["weight_files"]),
        f"- Report id: `{report['report_id']}`; schema `{report['schema_version']}`; created {report['created_at']}",
        f"- Suites: {', '.join(report['settings']['suites'])}; limit {report['settings']['limit']}; seed {report['settings']['seeds']['random']}; "
        f"{report['settings']['bootstrap_iters']} bootstrap resamples, {int(report['settings']['ci_level'] * 100)}% CIs",
        f"- Judge: primary `{j['primary']}`; " + "; ".join(
            f"`{d['name']}` ({d['kind']}, {d['version']})" + (
                f", calibration precision {_fmt(d['calibration']['precision'])} recall {_fmt(d['calibration']['recall'])} on {d['calibration']['n']} labelled responses"
                if d.get("calibration") else "") for d in j["judges"]),
        f"- Toxicity scorer: `{j['toxicity_scorer']['name']}` ({j['toxicity_scorer']['version']}); sentiment: `{j['sentiment_scorer']['name']}`",
        f"- Samples: `{report['samples']['file']}` ({report['samples']['n_records']} records, sha256 `{report['samples']['sha256'][:16]}…`"
        + (f", {report['samples']['n_redacted']} outputs redacted)" if report["samples"]["redacted"] else ")"),
    ]
    if j.get("agreement"):
        a = j["agreement"]
        lines.append(f"- Judge agreement ({' vs '.join(a['judges'])}): Cohen's kappa {_fmt(a['kappa'])}, "
                     f"agreement {_fmt(a['percent_agreement'])} on {a['n']} items, {len(a['disagreements'])} disagreements")
    return lines


def render_markdown(report: dict, charts) -> str:
    out = ["# Bias and safety audit report", ""] + _summary_lines(report) + [""]
    for t in report["tasks"]:
        out += [f"## {t['name']} ({t['suite']}, v{t['version']})", "",
                f"Data: {t['dataset']['source']} ({t['dataset']['n_items_evaluated']} of {t['dataset']['n_items_available']} items); "
                f"{t['num_fewshot']}-shot; chat template {'on' if t['apply_chat_template'] else 'off'}", "",
                "| metric | group | value | 95% CI | n |", "|---|---|---|---|---|"]
        for m in report["metrics"]:
            if m["task"] == t["name"]:
                out.append(f"| {m['metric']} | {m['group']} | {_fmt(m['value'])} | {_ci(m)} | {m['n']} |")
        out.append("")
    if charts:
        out += ["## Charts", ""] + [f"![{label}](charts/{name})" for name, label in charts] + [""]
    ag = report["judge"].get("agreement")
    if ag and ag["disagreements"]:
        out += ["## Judge disagreements", "", "| task | item | labels |", "|---|---|---|"]
        out += [f"| {d['task']} | {d['item_id']} | {d['labels']} |" for d in ag["disagreements"]]
        out.append("")
    return "\n".join(out)


def render_html(report: dict, charts, records) -> str:
    e = _html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Audit report</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}"
             "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}</style></head><body>",
             "<h1>Bias and safety audit report</h1><ul>"]
    import re

    for line in _summary_lines(report):
        text = e(line[2:])
        text = re.sub(r"`([^`]*)`", r"<code>\1</code>", text)
        parts.append(f"<li>{text}</li>")
    parts.append("</ul>")
    for t in report["tasks"]:
        parts.append(f"<h2>{e(t['name'])} <small>({e(t['suite'])}, v{e(t['version'])})</small></h2>")
        parts.append(f"<p>Data: {e(t['dataset']['source'])} ({t['dataset']['n_items_evaluated']} of "
                     f"{t['dataset']['n_items_available']} items)</p>")
        parts.append("<table><tr><th>metric</th><th>group</th><th>value</th><th>95% CI</th><th>n</th></tr>")
        for m in report["metrics"]:
            if m["task"] == t["name"]:
                parts.append(f"<tr><td>{e(m['metric'])}</td><td>{e(m['group'])}</td><td>{_fmt(m['value'])}</td>"
                             f"<td>{_ci(m)}</td><td>{m['n']}</td></tr>")
        parts.append("</table>")
    if charts:
        parts.append("<h2>Charts</h2>")
        for name, label in charts:
            parts.append(f"<figure><img src='charts/{e(name)}' alt='{e(label)}'><figcaption>{e(label)}</figcaption></figure>")
    ag = report["judge"].get("agreement")
    if ag and ag["disagreements"]:
        parts.append("<h2>Judge disagreements</h2><table><tr><th>task</th><th>item</th><th>labels</th></tr>")
        for d in ag["disagreements"]:
            parts.append(f"<tr><td>{e(d['task'])}</td><td>{e(d['item_id'])}</td><td>{e(str(d['labels']))}</td></tr>")
        parts.append("</table>")
    gens = [r for r in records if r.get("output") is not None][:20]
    if gens:
        parts.append("<h2>Example generations (first 20)</h2><table><tr><th>task</th><th>item</th><th>output</th></tr>")
        for r in gens:
            parts.append(f"<tr><td>{e(r['task'])}</td><td>{e(r['item_id'])}</td><td>{e(r['output'][:300])}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_all(out: Path, report: dict, records) -> Path:
    charts = make_charts(out, report)
    (out / "report.md").write_text(render_markdown(report, charts), encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(render_html(report, charts, records), encoding="utf-8")
    return html_path
