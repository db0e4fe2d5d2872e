"""``dsv41 compare``, ``dsv41 efficiency``, ``dsv41 eval-tasks`` and ``dsv41 lm-eval`` (registered on the main app)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        model: str = typer.Option(None, help="Checkpoint directory or Hub id (default: the bundled checkpoint)."),
        baseline: str = typer.Option("llama-3-70b", help="Checkpoint directory / Hub id, or a built-in: llama-3-70b, llama-3.1-70b "
                                                         "(measured when a GPU and local weights exist, else published numbers only)."),
        suite: str = typer.Option("reasoning", help="Suite name or comma-separated tasks (arc_challenge, arc_easy, gsm8k, "
                                                    "hellaswag, mmlu, truthfulqa_mc1, truthfulqa_mc2)."),
        out: str = typer.Option("compare-report", help="Output directory."),
        data_dir: str = typer.Option(None, help="Directory with the upstream data files (shared/datasets layout); "
                                                "default: $DSV41_DATA_DIR, else the Hugging Face Hub."),
        limit: int = typer.Option(None, help="Evaluate the first N documents of each task."),
        num_fewshot: int = typer.Option(None, help="Shots for every task (default: each task's own: ARC 25, GSM8K 8, "
                                                   "HellaSwag 10, MMLU 5, TruthfulQA 0)."),
        seed: int = typer.Option(1234),
        batch_size: int = typer.Option(8),
        device: str = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
        dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16"),
        max_gen_toks: int = typer.Option(None, help="Cap on generated tokens (GSM8K default 256)."),
        bootstrap_iters: int = typer.Option(2000),
        skip_missing: bool = typer.Option(False, help="Run the tasks that have data and list the others as skipped."),
        measure_speed: bool = typer.Option(True, help="Also measure tokens/s and peak memory when both models fit."),
        moe_backend: str = typer.Option("auto", help="MoE backend of DeepSeek-V4 checkpoints."),
        quantization: str = typer.Option("auto", help="auto | none | nf4 | int8-bnb (DeepSeek-V4 checkpoints)."),
    ) -> None:
        """Evaluate two models on identical lm-eval tasks and write compare.json / .md / .png + per-sample outputs."""
        from dsv41.evals.compare import CompareError, CompareOptions, run_compare

        from dsv41 import default_model_path

        opts = CompareOptions(model=model or default_model_path(), baseline=baseline, suite=suite, out=out,
                              data_dir=data_dir, limit=limit, num_fewshot=num_fewshot, seed=seed, batch_size=batch_size,
                              device=device, dtype=dtype, max_gen_toks=max_gen_toks, bootstrap_iters=bootstrap_iters,
                              skip_missing=skip_missing, measure_speed=measure_speed, moe_backend=moe_backend,
                              quantization=quantization)
        try:
            report = run_compare(opts)
        except CompareError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"{out}/compare.md")
        for task, s in report["tasks"].items():
            line = f"  {task}: model {100 * s['model']['score']:.1f}"
            if "baseline" in s:
                line += f", baseline {100 * s['baseline']['score']:.1f}, p={s['paired']['p_value']:.3g}"
            typer.echo(line)

    @app.command("efficiency")
    def efficiency_cmd(
        model: str = typer.Option("dsv41-tiny", help="Built-in name, config.json or checkpoint directory."),
        baseline: str = typer.Option("llama-3-70b", help="Built-in name, config.json or checkpoint directory."),
        contexts: str = typer.Option("4096,32768,131072", help="Comma-separated context lengths."),
        kv_bytes: float = typer.Option(2.0, help="Bytes per cached value (2 = bf16, 1 = fp8)."),
        measure: bool = typer.Option(True, help="Measure tokens/s and peak memory when both are local checkpoints that fit."),
        device: str = typer.Option(None),
        prompt_tokens: int = typer.Option(256),
        new_tokens: int = typer.Option(32),
        json_out: str = typer.Option(None, "--json", help="Also write the full result as JSON to this path."),
    ) -> None:
        """Analytic parameters, FLOPs/token (prefill, decode) and KV-cache bytes, with ratios; built-ins: dsv41-tiny,
        deepseek-v4-flash, deepseek-v4-pro, llama-3-70b, llama-3.1-70b."""
        import json
        from pathlib import Path

        from dsv41.evals.efficiency import (
            ConfigError,
            compare_efficiency,
            efficiency_markdown,
            load_arch,
        )
        from dsv41.evals.measure import can_run, measure_in_subprocess

        try:
            ctx = tuple(int(c) for c in contexts.split(",") if c.strip())
            result = compare_efficiency(model, baseline, ctx, kv_bytes)
        except (ConfigError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        measured = None
        if measure:
            import torch

            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            checks = {k: can_run(s, load_arch(s).total_params(), dev) for k, s in (("model", model), ("baseline", baseline))}
            if all(ok for ok, _ in checks.values()):
                measured = {k: measure_in_subprocess(s, Path(s).name, prompt_tokens, new_tokens, dev)
                            for k, s in (("model", model), ("baseline", baseline))}
            else:
                measured = {"skipped": "; ".join(f"{k}: {why}" for k, (ok, why) in checks.items() if not ok)}
        result["measured"] = measured
        typer.echo(efficiency_markdown(result, measured))
        if json_out:
            Path(json_out).write_text(json.dumps(result, indent=1, default=str))

    @app.command("eval-tasks")
    def tasks_cmd() -> None:
        """Print the lm-eval include path of the kit's tasks and the task names."""
        from dsv41.evals.compare import SUITES, TASKS_DIR

        typer.echo(f"include path: {TASKS_DIR}")
        for suite, tasks in SUITES.items():
            typer.echo(f"{suite}: {' '.join(tasks)} (group dsv41_{suite})")

    @app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def lm_eval_cmd(ctx: typer.Context) -> None:
        """lm-eval's own CLI with the `dsv41` model registered and the kit's tasks on the include path,
        e.g. `dsv41 lm-eval run --model dsv41 --tasks dsv41_arc_easy --metadata '{"data_dir": "DIR"}'`."""
        from dsv41.evals.lmeval import main

        main(list(ctx.args))
