"""`dsv41 generate` and `dsv41 chat`: stream text from a DeepSeek-V4 checkpoint (default: the bundled one)."""

from __future__ import annotations

import os
from pathlib import Path
from threading import Thread

import typer


def resolve_model(model: str | None) -> str:
    """A local checkpoint directory or a Hub id; a clear error lists what was looked for."""
    from dsv41 import default_model_path

    if model is None:
        model = default_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise typer.BadParameter(f"{path} is a directory but has no config.json (not a model checkpoint)")
        return str(path)
    looked = [f"local directory {path.resolve()}"]
    if "/" in model and not path.exists() and os.environ.get("HF_HUB_OFFLINE") != "1":
        return model  # a Hub id; huggingface_hub reports download errors itself
    if "/" in model:
        looked.append(f"Hugging Face Hub repo {model!r} (offline mode: HF_HUB_OFFLINE=1)")
    raise typer.BadParameter("model not found; looked for: " + "; ".join(looked))


def load(model: str | None, dtype: str = "auto", moe_backend: str = "auto"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    kwargs = {"moe_backend": moe_backend} if (Path(path) / "modeling_deepseek_v4.py").exists() else {}
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch_dtype, **kwargs).eval()
    return tok, lm


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if max_new_tokens <= 0:
        raise typer.BadParameter(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise typer.BadParameter(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise typer.BadParameter(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise typer.BadParameter(f"--top-k must be >= 0, got {top_k}")


def stream(tok, lm, input_ids, max_new_tokens, temperature, top_p, top_k, seed):
    """Yield decoded text pieces as the model produces them (TextIteratorStreamer)."""
    import torch
    from transformers import TextIteratorStreamer

    torch.manual_seed(seed)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=temperature > 0, temperature=temperature or None, top_p=top_p, top_k=top_k or None)
    args = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
    worker = Thread(target=lm.generate, kwargs=args, daemon=True)
    worker.start()
    yield from streamer
    worker.join()


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        prompt: str = typer.Argument(..., help="Text to continue."),
        model: str = typer.Option(None, help="Checkpoint directory or Hub id (default: the bundled checkpoint)."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
        temperature: float = typer.Option(0.8, help="0 = greedy."),
        top_p: float = typer.Option(0.95, "--top-p"),
        top_k: int = typer.Option(50, "--top-k", help="0 = off."),
        seed: int = typer.Option(0),
        dtype: str = typer.Option("auto", help="auto | bf16 | fp32"),
        moe_backend: str = typer.Option("auto", "--moe-backend"),
    ) -> None:
        """Stream a continuation of PROMPT token by token."""
        if not prompt.strip():
            raise typer.BadParameter("the prompt is empty")
        check_sampling(max_new_tokens, temperature, top_p, top_k)
        tok, lm = load(model, dtype, moe_backend)
        ids = tok(prompt, return_tensors="pt").input_ids
        typer.echo(prompt, nl=False)
        for piece in stream(tok, lm, ids, max_new_tokens, temperature, top_p, top_k, seed):
            typer.echo(piece, nl=False)
        typer.echo()

    @app.command("chat")
    def chat(
        model: str = typer.Option(None, help="Checkpoint directory or Hub id (default: the bundled checkpoint)."),
        system: str = typer.Option("", help="System prompt."),
        max_new_tokens: int = typer.Option(96, "--max-new-tokens"),
        temperature: float = typer.Option(0.8),
        top_p: float = typer.Option(0.95, "--top-p"),
        top_k: int = typer.Option(50, "--top-k"),
        seed: int = typer.Option(0),
    ) -> None:
        """Interactive multi-turn chat using the tokenizer's chat template (empty line or /exit quits)."""
        check_sampling(max_new_tokens, temperature, top_p, top_k)
        tok, lm = load(model)
        if not tok.chat_template:
            raise typer.BadParameter("this tokenizer has no chat template")
        messages = [{"role": "system", "content": system}] if system else []
        turn = 0
        while True:
            try:
                user = input("you> ")
            except EOFError:
                break
            if not user.strip() or user.strip() == "/exit":
                break
            messages.append({"role": "user", "content": user})
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            typer.echo("model> ", nl=False)
            reply = []
            for piece in stream(tok, lm, ids, max_new_tokens, temperature, top_p, top_k, seed + turn):
                reply.append(piece)
                typer.echo(piece, nl=False)
            typer.echo()
            messages.append({"role": "assistant", "content": "".join(reply).strip()})
            turn += 1
