"""`dsv41 train`: the pretraining recipe (see training/train.py)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        data: list[Path] = typer.Argument(..., help="Plain-text files to train on."),
        out: Path = typer.Option(..., help="Output directory (checkpoint, tokenizer, plots, logs)."),
        vocab_size: int = typer.Option(4096, "--vocab-size"),
        seq_len: int = typer.Option(256, "--seq-len"),
        batch_size: int = typer.Option(8, "--batch-size"),
        steps: int = typer.Option(300),
        lr: float = typer.Option(3e-3),
        warmup: int = typer.Option(30),
        precision: str = typer.Option("fp32", help="fp32 | bf16"),
        eval_every: int = typer.Option(50, "--eval-every"),
        save_every: int = typer.Option(100, "--save-every"),
        seed: int = typer.Option(0),
        resume: bool = typer.Option(False, help="Continue from OUT/train_state."),
    ) -> None:
        """Train a tiny DeepSeek-V4 model (tokenizer included). Multi-GPU: `accelerate launch -m dsv41.training.train ...`."""
        from .train import TrainConfig
        from .train import train as run

        missing = [str(p) for p in data if not p.is_file()]
        if missing:
            raise typer.BadParameter(f"training text not found: {', '.join(missing)}")
        if precision not in ("fp32", "bf16"):
            raise typer.BadParameter(f"--precision must be fp32 or bf16, got {precision}")
        run(TrainConfig(data=[str(p) for p in data], out=str(out), vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size, steps=steps, lr=lr, warmup=warmup, precision=precision, eval_every=eval_every, save_every=save_every, seed=seed, resume=resume))
