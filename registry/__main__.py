"""``python -m dsv41.registry ...`` = ``dsv41 registry ...``."""

import typer
from dsv41.registry.cli import register

app = typer.Typer(add_completion=False)
register(app)

if __name__ == "__main__":
    app(prog_name="dsv41")
