"""The ``dsv41`` command line. Each concern adds its sub-commands in its own ``cli`` module;
heavy imports happen inside the commands so that ``dsv41 --help`` stays fast."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="dsv41",
    help="DeepSeek-V4.1 release kit: run, quantize, evaluate, audit and release the model.",
    no_args_is_help=True,
    add_completion=False,
)

# (module, attribute, group name or None for top-level commands). A module that is not
# present yet (work in progress) is skipped; any other import error is raised.
_SUBCOMMANDS = [
    ("dsv41.modeling.cli", "register", None),
    ("dsv41.training.cli", "register", None),
    ("dsv41.kernels.cli", "register", None),
    ("dsv41.quantization.cli", "register", None),
    ("dsv41.evals.cli", "register", None),
    ("dsv41.audit.cli", "register", None),
    ("dsv41.space.cli", "register", None),
    ("dsv41.registry.cli", "register", None),
    ("dsv41.release.cli", "register", None),
]


def _load_subcommands() -> None:
    for module_name, attr, _ in _SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        getattr(module, attr)(app)


@app.callback()
def _root() -> None:
    """DeepSeek-V4.1 release kit."""


@app.command("version")
def version() -> None:
    """Print the kit's version and the versions of the libraries it runs on."""
    import torch
    import transformers

    from dsv41 import __version__

    typer.echo(f"dsv41 {__version__} (torch {torch.__version__}, transformers {transformers.__version__})")


_load_subcommands()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
