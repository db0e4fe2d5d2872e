"""``dsv41 registry serve | add-auditor | log-check``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    reg = typer.Typer(help="Audit-report registry service (FastAPI; SQLite or PostgreSQL via DATABASE_URL).",
                      no_args_is_help=True)

    @reg.command("serve")
    def serve(
        host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
        port: int = typer.Option(8741),
        database_url: str = typer.Option(None, "--database-url", envvar="DATABASE_URL",
                                         help="postgresql://... [default: SQLite under --home]"),
        home: str = typer.Option(None, "--home", envvar="DSV41_REGISTRY_HOME",
                                 help="Data directory (SQLite file, log key) [default: ~/.dsv41/registry]."),
        release: list[str] = typer.Option(None, "--release", help="Register a model directory as a release "
                                          "(NAME=DIR or DIR; repeatable)."),
        max_bytes: int = typer.Option(None, "--max-bytes", help="Request size limit [default: 32 MiB]."),
    ) -> None:
        """Run the registry HTTP API."""
        import uvicorn
        from dsv41.registry.api import create_app
        from dsv41.registry.service import RegistryService
        from dsv41.registry.validation import RegistryError

        kw = {"max_body_bytes": max_bytes} if max_bytes else {}
        service = RegistryService.from_env(database_url=database_url, data_dir=home, **kw)
        for item in release or []:
            name, _, path = item.rpartition("=")
            try:
                out = service.register_release_dir(path, name or None)
            except RegistryError as exc:
                typer.echo(f"error: --release {item}: {exc.message}", err=True)
                raise typer.Exit(2) from None
            typer.echo(f"release {out['name']}: {out['fingerprint']} ({out['status']})", err=True)
        typer.echo(f"registry on http://{host}:{port} ({service.db.display_url}); log key {service.identity.fingerprint}",
                   err=True)
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning", timeout_keep_alive=30)

    @reg.command("add-auditor")
    def add_auditor(
        public_identity: str = typer.Argument(..., help="identity.pub.json (or its directory)."),
        to: str = typer.Option(..., "--to", help="Registry URL."),
    ) -> None:
        """Register an auditor's public identity with a registry (POST /auditors)."""
        from dsv41.registry.client import SubmitError, register_auditor_http
        from dsv41.release.identity import IdentityError, PublicIdentity

        try:
            pub = PublicIdentity.load(public_identity)
            res = register_auditor_http(pub.to_dict(), to)
        except (IdentityError, SubmitError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        if not res.ok:
            typer.echo(f"REJECTED (HTTP {res.status}): {res.body.get('detail')}", err=True)
            raise typer.Exit(1)
        typer.echo(f"{res.body['status']}: {res.body['name']} {res.body['fingerprint']}")

    @reg.command("log-check")
    def log_check(
        url: str = typer.Argument(..., help="Registry URL."),
        state: str = typer.Option("log-state.json", help="File holding the last tree head this monitor saw."),
        log_key: str = typer.Option(None, "--log-key", help="Pin the log identity fingerprint."),
    ) -> None:
        """Monitor a registry's log: verify the signed tree head and that it extends the last one seen."""
        from dsv41.registry.monitor import LogCheckError, check_log

        try:
            msg = check_log(url, state, log_key=log_key)
        except LogCheckError as exc:
            typer.echo(f"FAILED: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(msg)

    app.add_typer(reg, name="registry")
