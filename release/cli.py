"""``dsv41 keys ...`` and ``dsv41 release ...`` commands.

Passphrases are read from the environment variable named by ``--passphrase-env``
(default ``DSV41_PASSPHRASE``) when it is set, otherwise prompted for without echo.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

keys_app = typer.Typer(help="Signing identities: hybrid Ed25519 + ML-DSA-65 keys (plus release keys).", no_args_is_help=True)
release_app = typer.Typer(
    help="Release tooling: model card, signed manifest, encrypted weights, Hub upload.", no_args_is_help=True
)

PASSPHRASE_ENV = "DSV41_PASSPHRASE"


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.add_typer(release_app, name="release")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _passphrase(env_name: str, *, confirm: bool = False) -> str:
    value = os.environ.get(env_name)
    if value:
        return value
    return typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)


def _default_dir() -> Path:
    from dsv41.release.identity import default_identity_dir

    return default_identity_dir()


def _load_private(identity: Path | None, passphrase_env: str):
    from dsv41.release.identity import Identity

    return Identity.load(identity or _default_dir(), _passphrase(passphrase_env))


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------


@keys_app.command("new")
def keys_new(
    out: Path | None = typer.Option(None, "--out", help="Directory to write to [default: $DSV41_IDENTITY or ~/.dsv41/identity]"),
    name: str = typer.Option("", "--name", help="Name recorded in the identity (e.g. your auditor name)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing identity."),
    passphrase_env: str = typer.Option(PASSPHRASE_ENV, "--passphrase-env", help="Environment variable holding the passphrase."),
) -> None:
    """Create an identity: Ed25519 + ML-DSA-65 signing keys, ECDSA P-256 (OpenSSF model signing) and ML-KEM-768."""
    from dsv41.release.errors import ReleaseError
    from dsv41.release.identity import Identity

    directory = out or _default_dir()
    try:
        ident = Identity.generate(name=name)
        pub, key = ident.save(directory, _passphrase(passphrase_env, confirm=True), overwrite=force)
    except ReleaseError as exc:
        _fail(exc)
    typer.echo(f"fingerprint: {ident.fingerprint}")
    typer.echo(f"public identity: {pub}  (share this)")
    typer.echo(f"private keys:    {key}  (encrypted with your passphrase, mode 0600)")


@keys_app.command("show")
def keys_show(
    path: Path | None = typer.Argument(None, help="identity.pub.json / identity.key.json or its directory"),
    as_json: bool = typer.Option(False, "--json", help="Print the public identity as JSON."),
) -> None:
    """Show an identity's name, fingerprint and public keys (never the private keys)."""
    from dsv41.release.errors import ReleaseError
    from dsv41.release.identity import ECDSA_P256, PublicIdentity

    try:
        pub = PublicIdentity.load(path or _default_dir())
    except ReleaseError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(pub.to_dict(), indent=2))
        return
    typer.echo(f"name:        {pub.name or '(none)'}")
    typer.echo(f"created:     {pub.created}")
    typer.echo(f"fingerprint: {pub.fingerprint}")
    typer.echo("signing:     ed25519 + ml-dsa-65 (a signature is valid only if both verify)")
    typer.echo(f"encryption:  ml-kem-768 key id {pub.kem_key_id()}")
    typer.echo("model signing (OpenSSF, ecdsa-p256) public key:")
    typer.echo(pub.public_pem(ECDSA_P256).decode().rstrip())


# ---------------------------------------------------------------------------------------------
# release
# ---------------------------------------------------------------------------------------------


@release_app.command("card")
def release_card(
    model: Path = typer.Option(..., "--model", help="Model directory (config.json + weights)."),
    evals: Path | None = typer.Option(None, "--evals", help="`dsv41 compare` JSON or a directory of them."),
    audits: Path | None = typer.Option(None, "--audits", help="Audit report.json, its directory, or a directory of report directories."),
    facts: Path | None = typer.Option(None, "--facts", help="JSON with release facts (training data, compute, energy, copyright policy...)."),
    license_file: Path | None = typer.Option(None, "--license-file", help="LICENSE-NONCOMMERCIAL to ship with the model."),
    repo: str | None = typer.Option(None, "--repo", help="ORG/NAME the release goes to (absolute source URLs)."),
    force: bool = typer.Option(False, "--force", help="Replace a README.md not written by this command."),
    hub_validate: bool = typer.Option(False, "--hub-validate", help="Also validate with the Hub's API (needs network)."),
) -> None:
    """Write MODEL/README.md (model card with Hub metadata, results, audit findings, EU AI Act items)."""
    from dsv41.release.card import write_model_card
    from dsv41.release.errors import ReleaseError

    try:
        res = write_model_card(
            model, evals=evals, audits=audits, facts=facts, license_file=license_file, repo_id=repo, force=force
        )
    except ReleaseError as exc:
        _fail(exc)
    for w in res.warnings:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    if hub_validate:
        from huggingface_hub import ModelCard

        try:
            ModelCard.load(res.path).validate()
        except Exception as exc:  # network or validation error
            _fail(f"{res.path}: Hub validation failed: {exc}")
    typer.echo(f"wrote {res.path} ({res.n_model_index} model-index results, {len(res.evidence)} evidence files)")


@release_app.command("manifest")
def release_manifest(
    path: Path = typer.Argument(..., help="Model directory to sign."),
    identity: Path | None = typer.Option(None, "--identity", help="identity.key.json or its directory."),
    passphrase_env: str = typer.Option(PASSPHRASE_ENV, "--passphrase-env"),
) -> None:
    """Sign every file (SHA-256) in the OpenSSF Model Signing format + an ML-DSA-65/Ed25519 co-signature."""
    from dsv41.release.errors import ReleaseError
    from dsv41.release.manifest import (
        COSIGNATURE_FILENAME,
        SIGNATURE_FILENAME,
        sign_model_dir,
    )

    try:
        info = sign_model_dir(path, _load_private(identity, passphrase_env))
    except ReleaseError as exc:
        _fail(exc)
    typer.echo(f"signed {len(info.files)} files; root digest sha256:{info.root_digest}")
    typer.echo(f"wrote {path / SIGNATURE_FILENAME} and {path / COSIGNATURE_FILENAME} (signer {info.signer.fingerprint})")


@release_app.command("verify")
def release_verify(
    path: Path = typer.Argument(..., help="Model directory to verify."),
    identity: Path | None = typer.Option(None, "--identity", help="Trusted signer's identity.pub.json."),
    trust: list[str] = typer.Option([], "--trust", help="Trusted signer fingerprint (repeatable)."),
) -> None:
    """Check the signatures and that no file is missing, extra or changed."""
    from dsv41.release.errors import ReleaseError
    from dsv41.release.identity import PublicIdentity
    from dsv41.release.manifest import verify_model_dir

    try:
        pub = PublicIdentity.load(identity) if identity else None
        info = verify_model_dir(path, public_identity=pub, trusted_fingerprints=trust)
    except ReleaseError as exc:
        _fail(exc)
    for note in info.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    who = f"{info.signer.name!r} ({info.signer.fingerprint})"
    typer.echo(f"OK: {len(info.files)} files match the manifest signed by {who}{'' if info.pinned else ' [signer not pinned]'}")


@release_app.command("encrypt")
def release_encrypt(
    path: Path = typer.Argument(..., help="Model directory or file."),
    recipient: list[Path] = typer.Option(..., "--recipient", help="Recipient identity.pub.json or ML-KEM-768 PEM (repeatable)."),
    out: Path | None = typer.Option(None, "--out", help="Output directory [default: PATH.encrypted]"),
    chunk_size: int = typer.Option(4 * 1024 * 1024, "--chunk-size", help="Plaintext bytes per authenticated chunk."),
) -> None:
    """Encrypt each file with AES-256-GCM (chunked) under a fresh key wrapped with ML-KEM-768 per recipient."""
    from dsv41.release.encryption import encrypt_path, load_recipient
    from dsv41.release.errors import ReleaseError

    out = out or path.with_name(path.name + ".encrypted")
    try:
        written = encrypt_path(path, out, [load_recipient(r) for r in recipient], chunk_size=chunk_size)
    except ReleaseError as exc:
        _fail(exc)
    typer.echo(f"encrypted {len(written)} files for {len(recipient)} recipient(s) into {out}")


@release_app.command("decrypt")
def release_decrypt(
    path: Path = typer.Argument(..., help="Encrypted directory or .dsv41enc file."),
    out: Path | None = typer.Option(None, "--out", help="Output directory [default: PATH.decrypted]"),
    identity: Path | None = typer.Option(None, "--identity", help="identity.key.json or its directory."),
    passphrase_env: str = typer.Option(PASSPHRASE_ENV, "--passphrase-env"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Verify the decrypted model's manifest when it has one."),
) -> None:
    """Decrypt files made by `release encrypt`; any tampering fails naming the file and chunk."""
    from dsv41.release.encryption import decrypt_path
    from dsv41.release.errors import ReleaseError
    from dsv41.release.manifest import SIGNATURE_FILENAME, verify_model_dir

    from dsv41.release.encryption import SUFFIX

    if out is None:
        if path.is_file() and path.name.endswith(SUFFIX):
            out = path.with_name(path.name[: -len(SUFFIX)])
        else:
            out = path.with_name(path.name + ".decrypted")
    try:
        ident = _load_private(identity, passphrase_env)
        if path.is_dir():
            out.mkdir(parents=True, exist_ok=True)
        written = decrypt_path(path, out, ident)
        typer.echo(f"decrypted {len(written)} files into {out}")
        if verify and out.is_dir() and (out / SIGNATURE_FILENAME).is_file():
            info = verify_model_dir(out)
            typer.echo(f"manifest OK: {len(info.files)} files (signer {info.signer.fingerprint})")
    except ReleaseError as exc:
        _fail(exc)


@release_app.command("push")
def release_push(
    path: Path = typer.Argument(..., help="Signed model directory."),
    repo: str = typer.Option(..., "--repo", help="Hub repo ORG/NAME."),
    identity: Path | None = typer.Option(None, "--identity", help="Require this signer (identity.pub.json)."),
    trust: list[str] = typer.Option([], "--trust", help="Trusted signer fingerprint (repeatable)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing to main."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to commit to."),
    message: str | None = typer.Option(None, "--message", help="Commit message."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Verify and list the files without uploading."),
) -> None:
    """Upload the signed files with huggingface_hub (refuses when the manifest does not verify)."""
    from dsv41.release.errors import ReleaseError
    from dsv41.release.identity import PublicIdentity
    from dsv41.release.push import plan_push, push_release

    try:
        pub = PublicIdentity.load(identity) if identity else None
        if dry_run:
            plan = plan_push(path, repo, public_identity=pub, trusted_fingerprints=trust)
            for f in plan.files:
                typer.echo(f)
            typer.echo(f"would upload {len(plan.files)} files to {repo}")
            return
        commit = push_release(
            path, repo, public_identity=pub, trusted_fingerprints=trust, private=private or None,
            create_pr=create_pr, revision=revision, commit_message=message,
        )
    except ReleaseError as exc:
        _fail(exc)
    typer.echo(f"pushed to {repo}: {getattr(commit, 'commit_url', commit)}")
