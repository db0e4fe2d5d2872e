"""``dsv41 audit run | verify | export`` (registered on the main ``dsv41`` app)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    audit = typer.Typer(help="Bias and safety audits through lm-evaluation-harness, with verifiable reports.",
                        no_args_is_help=True)

    @audit.command("run")
    def run_cmd(
        model: str = typer.Option(None, help="Local directory or Hub id (default: the bundled checkpoint)."),
        suite: str = typer.Option("bias,safety", help="Comma-separated suites (bias, safety) or task names (bbq, xstest, ...)."),
        out: str = typer.Option("audit-report", help="Output directory (never overwritten once finished)."),
        limit: int = typer.Option(None, help="At most N items per task, stratified over groups."),
        data_dir: str = typer.Option(None, help="Upstream data files (shared/datasets layout) or hf://datasets/OWNER/NAME; default: shipped probe sets."),
        revision: str = typer.Option(None, help="Hub revision of --model."),
        judge: str = typer.Option("rule", help="'rule' or hub:MODEL_ID (e.g. a Llama Guard checkpoint); the rule judge always runs too."),
        toxicity_scorer: str = typer.Option("lexicon", help="lexicon | hf:MODEL_ID | module.path:function"),
        redact: bool = typer.Option(False, help="Replace harmful generations in samples.jsonl by salted SHA-256 commitments."),
        seed: int = typer.Option(1234),
        bootstrap_iters: int = typer.Option(1000),
        batch_size: int = typer.Option(8),
        device: str = typer.Option(None),
        chat_template: str = typer.Option("auto", help="auto | on | off (generation tasks)."),
        trust_remote_code: bool = typer.Option(None, "--trust-remote-code/--no-trust-remote-code",
                                               help="Default: on for local directories, off for Hub ids."),
    ) -> None:
        """Run the audit and print the path of report.html."""
        from dsv41 import default_model_path
        from dsv41.audit.data import DataError
        from dsv41.audit.judges import JudgeError
        from dsv41.audit.runner import AuditError, RunOptions, run

        opts = RunOptions(model=model or default_model_path(), suite=suite, out=out, limit=limit, data_dir=data_dir,
                          revision=revision, judge=judge, toxicity_scorer=toxicity_scorer, redact=redact, seed=seed,
                          bootstrap_iters=bootstrap_iters, batch_size=batch_size, device=device,
                          chat_template=chat_template, trust_remote_code=trust_remote_code)
        try:
            html = run(opts, log=lambda m: typer.echo(m, err=True))
        except (AuditError, DataError, JudgeError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(str(html))

    @audit.command("verify")
    def verify_cmd(
        report_dir: str = typer.Argument(..., help="Directory holding report.json and samples.jsonl."),
        model: str = typer.Option(None, help="Model directory to re-hash (default: the path recorded in the report)."),
        data_dir: str = typer.Option(None, help="Data root to re-hash (default: the recorded one)."),
        weights: bool = typer.Option(True, "--weights/--no-weights", help="Re-hash the weight files."),
        salt_file: str = typer.Option(None, help="Auditor's redaction salt (private/redaction_salt.hex)."),
        unredacted: str = typer.Option(None, help="Unredacted samples (private/samples.unredacted.jsonl)."),
        require_signature: bool = typer.Option(False, "--require-signature", help="Fail when report.sig.json is missing."),
        signer: list[str] = typer.Option(None, "--signer", help="Trusted signer: identity fingerprint or identity.pub.json (repeatable)."),
        log: str = typer.Option(None, "--log", help="Registry URL: check the report's inclusion proof in its transparency log."),
        log_key: str = typer.Option(None, "--log-key", help="Pin the log's identity fingerprint (sha256:...)."),
    ) -> None:
        """Recompute fingerprints and metrics from the sample records, check both signatures of a
        signed report (and, with --log, its inclusion in a registry's log); exit 1 on any mismatch."""
        from dsv41.audit.verify import VerificationError, verify

        try:
            info = verify(report_dir, model_dir=model, data_dir=data_dir, check_weights=weights,
                          salt_file=salt_file, unredacted=unredacted)
        except VerificationError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from None
        typer.echo(f"OK: report {info['report_id'][:16]}…: {info['n_metrics']} metrics and fingerprints "
                   f"recomputed from {info['n_records']} sample records")
        from dsv41.audit.signing import check_signatures_cli

        check_signatures_cli(report_dir, require=require_signature or bool(signer) or bool(log), signer=signer,
                             log=log, log_key=log_key)

    @audit.command("export")
    def export_cmd(
        report_dir: str = typer.Argument(...),
        format: str = typer.Option(..., "--format", help="eee | hf-eval-results"),
        out: str = typer.Option(None, help="Destination (default: DIR/export)."),
    ) -> None:
        """Convert a report to Every Eval Ever JSON or Hugging Face .eval_results YAML."""
        from dsv41.audit.export import export

        try:
            paths = export(report_dir, format, out)
        except (ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        for p in paths:
            typer.echo(str(p))

    from dsv41.audit.signing import register_commands

    register_commands(audit)
    app.add_typer(audit, name="audit")
