"""``dsv41 quantize | dequantize | inspect | quant-report``."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


def _parse_size(text: str) -> int:
    t = text.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def _default_text_files() -> tuple[Path | None, Path | None]:
    import os

    from dsv41 import PACKAGE_ROOT

    env = os.environ.get("DSV41_SHARED_DATASETS")
    root = Path(env) if env else PACKAGE_ROOT.parent.parent / "shared" / "datasets"
    f = root / "tinyshakespeare" / "input.txt"
    return (f, f) if f.exists() else (None, None)


def _split_default_text(path: Path) -> tuple[str, str]:
    """Held-out = the last 10% of the file, calibration = the first 10% (disjoint)."""
    text = path.read_text(encoding="utf-8")
    n = len(text) // 10
    return text[-n:], text[:n]


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize(
        model: str = typer.Option(None, "--model", help="input checkpoint folder (default: the bundled checkpoint)"),
        out: Path = typer.Option(..., "--out", help="output folder (written atomically)"),
        method: str = typer.Option("fp8", "--method", help="fp8 | mxfp4 | int8 | int4-rtn | int4-gptq"),
        block_size: str = typer.Option("128", "--block-size", help="FP8 block: N (NxN) or RxC"),
        scale_fmt: str = typer.Option("ue8m0", "--scale-fmt", help="FP8 scales: ue8m0 (V4 '.scale') or float (V3 'weight_scale_inv')"),
        expert_dtype: str = typer.Option("fp8", "--expert-dtype", help="with --method fp8: fp8 or fp4 routed experts (V4-Flash layout)"),
        partial_blocks: bool = typer.Option(False, "--partial-blocks", help="allow partial FP8 edge blocks (DeepSeek ceil layout)"),
        group_size: int = typer.Option(None, "--group-size", help="int group along K (default 128 for int8, 32 for int4; <=0: per row)"),
        calib_text: Path = typer.Option(None, "--calib-text", help="int4-gptq calibration text file (default: shared tinyshakespeare head)"),
        calib_tokens: int = typer.Option(4096, "--calib-tokens"),
        seq_len: int = typer.Option(128, "--seq-len"),
        max_shard_size: str = typer.Option("2GiB", "--max-shard-size"),
        chunk_size: str = typer.Option("64MiB", "--chunk-size", help="working memory per conversion step"),
        overwrite: bool = typer.Option(False, "--overwrite"),
        report: bool = typer.Option(False, "--report", help="also write the quality report of this method into OUT/report"),
    ):
        """Quantize a checkpoint folder into a self-contained folder with a quantization_config."""
        from dsv41 import default_model_path

        from .checkpoint import METHODS, QuantSpec, quantize_checkpoint
        from .codecs import QuantizationError

        model = model or default_model_path()
        try:
            if method not in METHODS:
                raise QuantizationError(f"--method: expected one of {', '.join(METHODS)}, found {method!r}")
            parts = [int(p) for p in block_size.lower().split("x")]
            block = (parts[0], parts[-1])
            kw = dict(block=block, scale_fmt=scale_fmt, expert_dtype=expert_dtype, partial_blocks=partial_blocks, group_size=group_size)
            cal_text = None
            if method == "int4-gptq":
                import torch
                from transformers import AutoTokenizer

                from .gptq import collect_hessians
                from .report import _model_cls, token_windows

                if calib_text is None:
                    f, _ = _default_text_files()
                    if f is None:
                        raise QuantizationError("--calib-text: no calibration text given and the shared tinyshakespeare file is absent")
                    cal_text = _split_default_text(f)[1]
                else:
                    cal_text = calib_text.read_text(encoding="utf-8")
                tok = AutoTokenizer.from_pretrained(model)
                calib = token_windows(tok, cal_text, seq_len, calib_tokens)
                cm = _model_cls().from_pretrained(model, dtype=torch.float32).eval()
                spec0 = QuantSpec(method, **kw)
                kw["hessians"] = collect_hessians(
                    cm, calib.split(4), bits=4, group_size=spec0.group_size,
                    progress=lambda layer, n: typer.echo(f"gptq: {layer} done ({n} weights)"),
                )
                kw["calibration"] = {"windows": int(calib.shape[0]), "seq_len": seq_len, "source": str(calib_text or "tinyshakespeare head 10%")}
                del cm
            spec = QuantSpec(method, **kw)
            res = quantize_checkpoint(
                model, out, spec, max_shard_bytes=_parse_size(max_shard_size), chunk_bytes=_parse_size(chunk_size), overwrite=overwrite
            )
        except (QuantizationError, ValueError, OSError) as exc:
            _fail(exc)
        typer.echo(
            f"wrote {out} ({res['shards']} shard(s)): {res['output_bytes']:,} bytes, input {res['input_bytes']:,} bytes "
            f"(x{res['output_bytes'] / max(res['input_bytes'], 1):.3f}); tensors {res['tensors']}"
        )
        if res["gptq_rtn_fallback"]:
            typer.echo(f"gptq: {len(res['gptq_rtn_fallback'])} weight(s) got no calibration input and use RTN")
        if report:
            from .report import run_quality_report

            held, cal = _report_texts(None, None)
            run_quality_report(model, Path(out) / "report", held, cal, methods=(method,), seq_len=seq_len, log=typer.echo)

    @app.command("dequantize")
    def dequantize(
        model: str = typer.Option(..., "--model", help="quantized checkpoint folder (any supported format)"),
        out: Path = typer.Option(..., "--out"),
        dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 | float16 | float32"),
        max_shard_size: str = typer.Option("2GiB", "--max-shard-size"),
        chunk_size: str = typer.Option("64MiB", "--chunk-size"),
        overwrite: bool = typer.Option(False, "--overwrite"),
    ):
        """Convert a quantized checkpoint back to plain bf16 (or fp16/fp32) weights."""
        import torch

        from .checkpoint import dequantize_checkpoint
        from .codecs import QuantizationError

        dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
        try:
            if dt is None:
                raise QuantizationError(f"--dtype: expected bfloat16, float16 or float32, found {dtype!r}")
            res = dequantize_checkpoint(model, out, dt, _parse_size(max_shard_size), _parse_size(chunk_size), overwrite)
        except (QuantizationError, ValueError, OSError) as exc:
            _fail(exc)
        typer.echo(f"wrote {out}: {res['dequantized']} tensor(s) dequantized to {dtype}, {res['data_bytes']:,} bytes")

    @app.command("inspect")
    def inspect(
        path: str = typer.Argument(..., help="checkpoint folder"),
        as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    ):
        """Per-tensor dtype, format, shape and bytes, with totals per format."""
        from .codecs import QuantizationError
        from .inspection import inspect_checkpoint

        try:
            info = inspect_checkpoint(path)
        except (QuantizationError, ValueError, OSError) as exc:
            _fail(exc)
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        width = max((len(t["name"]) for t in info["tensors"]), default=10)
        for t in info["tensors"]:
            typer.echo(f"{t['name']:<{width}}  {t['dtype']:<14} {t['format']:<26} {str(t['shape']):<18} {t['bytes']:>12,}")
        for fmt, b in sorted(info["bytes_by_format"].items()):
            typer.echo(f"  {fmt:<26} {b:>14,} bytes")
        qc = info.get("quantization_config")
        typer.echo(f"total: {info['total_bytes']:,} bytes in {info['n_tensors']} tensors ({info['files']} file(s))"
                   + (f"; quantization_config: {qc.get('dsv41_method', qc.get('quant_method'))}" if qc else ""))

    @app.command("quant-report")
    def quant_report(
        model: str = typer.Option(None, "--model", help="bf16 checkpoint folder (default: the bundled checkpoint)"),
        out: Path = typer.Option(Path("quant-report"), "--out"),
        methods: str = typer.Option(",".join(("fp8", "mxfp4", "int8", "int4-rtn", "int4-gptq")), "--methods", help="comma list; also bnb-nf4, bnb-int8"),
        text: Path = typer.Option(None, "--text", help="held-out text file (default: last 10% of the shared tinyshakespeare)"),
        calib_text: Path = typer.Option(None, "--calib-text", help="calibration text (default: first 10% of the same file)"),
        seq_len: int = typer.Option(128, "--seq-len"),
        max_tokens: int = typer.Option(4096, "--max-tokens"),
    ):
        """Quality of each method vs bf16: KL, top-1 agreement (95% CI), perplexity change, bytes, peak RSS."""
        from dsv41 import default_model_path

        from .codecs import QuantizationError
        from .report import run_quality_report

        model = model or default_model_path()
        try:
            held, cal = _report_texts(text, calib_text)
            report = run_quality_report(
                model, out, held, cal, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                seq_len=seq_len, max_tokens=max_tokens, log=typer.echo,
            )
        except (QuantizationError, ValueError, OSError) as exc:
            _fail(exc)
        from .report import markdown_table

        typer.echo(markdown_table(report))
        typer.echo(f"wrote {out}/report.json, report.md, report.png")


def _report_texts(text: Path | None, calib_text: Path | None) -> tuple[str, str | None]:
    from .codecs import QuantizationError

    default, _ = _default_text_files()
    if text is None:
        if default is None:
            raise QuantizationError("--text: no held-out text given and the shared tinyshakespeare file is absent")
        held, cal = _split_default_text(default)
    else:
        held, cal = text.read_text(encoding="utf-8"), None
    if calib_text is not None:
        cal = calib_text.read_text(encoding="utf-8")
    return held, cal
