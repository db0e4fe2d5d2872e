"""``dsv41 space``: run the Gradio Space (chat, audit, reports, submit) locally."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("space")
    def space(
        host: str = typer.Option("127.0.0.1", envvar="GRADIO_SERVER_NAME", help="Interface to listen on."),
        port: int = typer.Option(7860, envvar="GRADIO_SERVER_PORT"),
        model: str = typer.Option(None, envvar="DSV41_SPACE_MODEL",
                                  help="Local directory or Hub id [default: the bundled checkpoint]."),
        registry_url: str = typer.Option(None, "--registry-url", envvar="DSV41_REGISTRY_URL",
                                         help="Use a remote registry instead of the built-in one."),
        home: str = typer.Option(None, "--home", envvar="DSV41_REGISTRY_HOME",
                                 help="Data directory of the built-in registry [default: ~/.dsv41/registry]."),
    ) -> None:
        """Run the Space: the UI at / and (unless --registry-url) the registry API at /registry."""
        from dsv41.space.app import main

        argv = ["--host", host, "--port", str(port)]
        for flag, value in (("--model", model), ("--registry-url", registry_url), ("--home", home)):
            if value:
                argv += [flag, value]
        main(argv)
