"""Signed weight manifests: OpenSSF Model Signing + a post-quantum hybrid co-signature.

``sign_model_dir(path, identity)`` (``dsv41 release manifest PATH``) writes two files into the
model directory:

``model.sig``
    The OpenSSF Model Signing signature made by the ``model-signing`` package ("key" method):
    a Sigstore bundle whose DSSE envelope holds an in-toto statement listing the SHA-256 of
    every file of the directory (``files`` serialization), signed with the identity's
    ECDSA P-256 key. It verifies with the upstream tool too::

        model_signing verify key PATH --signature PATH/model.sig --public_key signer-ecdsa.pem

``model.sig.pq.json``
    The co-signature: the identity's hybrid Ed25519 + ML-DSA-65 signature
    (:mod:`dsv41.release.identity`, context ``dsv41/release-manifest/v1``) over exactly the
    bytes the OpenSSF signature covers (the DSSE pre-authentication encoding of the statement),
    plus the signer's public identity.

``verify_model_dir(path)`` (``dsv41 release verify``, and the model loader when called with
``verify_manifest=True``) accepts a directory only if the hybrid co-signature verifies, the
OpenSSF signature verifies with the same identity's ECDSA key, and the files on disk are
exactly the signed ones; otherwise it raises :class:`~dsv41.release.errors.ManifestError`
(:class:`~dsv41.release.errors.ManifestMismatch` naming each missing, extra or changed file).

Trust: by default the signer key is the one recorded in ``model.sig.pq.json``, which proves
the files are the ones that key signed. To also prove *who* signed, pin the signer: pass
``public_identity=`` or ``trusted_fingerprints=``, or set ``DSV41_TRUSTED_SIGNERS`` to a
comma-separated list of identity fingerprints.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dsv41.release.errors import ManifestError, ManifestMismatch
from dsv41.release.identity import (
    ECDSA_P256,
    Identity,
    IdentityError,
    PublicIdentity,
    SignatureError,
    verify,
)

SIGNATURE_FILENAME = "model.sig"
COSIGNATURE_FILENAME = "model.sig.pq.json"
COSIGNATURE_FORMAT = "dsv41-release-cosignature/v1"
MANIFEST_CONTEXT = "dsv41/release-manifest/v1"
TRUSTED_SIGNERS_ENV = "DSV41_TRUSTED_SIGNERS"
# Never part of the manifest: the signatures themselves and huggingface_hub's local-dir cache
# (model-signing additionally ignores .git, .github, .gitattributes and .gitignore).
IGNORED_PATHS = (SIGNATURE_FILENAME, COSIGNATURE_FILENAME, ".cache/huggingface")
_DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"


@dataclass
class ManifestInfo:
    """What a signed manifest says, and who signed it."""

    path: Path
    files: dict[str, str]  # relative path -> sha256 hex
    signer: PublicIdentity
    pinned: bool  # signer matched a trusted identity / fingerprint
    root_digest: str = ""
    notes: list[str] = field(default_factory=list)


def dsse_pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding (what the OpenSSF signature signs)."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _hashing_config(*, ignore_paths: Iterable[str], allow_symlinks: bool, hash_type: str = "sha256"):
    import model_signing

    # set_ignored_paths takes paths relative to the model directory (and keeps ignoring the
    # git files); they are recorded in the signed statement's serialization parameters.
    return (
        model_signing.hashing.Config()
        .use_file_serialization(hashing_algorithm=hash_type, allow_symlinks=allow_symlinks)
        .set_ignored_paths(paths=list(ignore_paths), ignore_git_paths=True)
        .set_allow_symlinks(allow_symlinks)
    )


def _model_dir(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ManifestError(f"{path}: not a model directory")
    return path


# ---------------------------------------------------------------------------------------------
# signing
# ---------------------------------------------------------------------------------------------


def sign_model_dir(path: str | os.PathLike, identity: Identity) -> ManifestInfo:
    """Hash every file of ``path`` and write ``model.sig`` and ``model.sig.pq.json`` into it."""
    import model_signing

    model = _model_dir(path)
    if not any(p.is_file() and p.name not in IGNORED_PATHS for p in model.rglob("*")):
        raise ManifestError(f"{model}: no files to sign")
    sig_path = model / SIGNATURE_FILENAME
    cosig_path = model / COSIGNATURE_FILENAME
    config = _hashing_config(ignore_paths=IGNORED_PATHS, allow_symlinks=True)
    # model-signing reads the key from a PEM file: hand it a copy encrypted under a one-time
    # random password in a private temporary directory, removed right after.
    one_time = secrets.token_urlsafe(32).encode("ascii")
    with tempfile.TemporaryDirectory(prefix="dsv41-sign-") as tmp:
        os.chmod(tmp, 0o700)
        key_file = Path(tmp) / "ecdsa-p256.pem"
        key_file.write_bytes(identity.ecdsa_pem(one_time))
        tmp_sig = Path(tmp) / SIGNATURE_FILENAME
        (
            model_signing.signing.Config()
            .use_elliptic_key_signer(private_key=key_file, password=one_time)
            .set_hashing_config(config)
            .sign(model, tmp_sig)
        )
        sig_text = tmp_sig.read_text(encoding="utf-8")
    payload_type, payload, statement = _parse_ossf_signature(sig_text, source=str(sig_path))
    cosig = {
        "format": COSIGNATURE_FORMAT,
        "signs": f"DSSE PAE of the statement in {SIGNATURE_FILENAME}",
        "signer_identity": identity.public.to_dict(),
        "hybrid_signature": identity.sign(dsse_pae(payload_type, payload), context=MANIFEST_CONTEXT),
    }
    sig_path.write_text(sig_text, encoding="utf-8")
    cosig_path.write_text(json.dumps(cosig, indent=2) + "\n", encoding="utf-8")
    return ManifestInfo(
        path=model,
        files=_resources(statement, source=str(sig_path)),
        signer=identity.public,
        pinned=True,
        root_digest=statement["subject"][0]["digest"]["sha256"],
    )


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------


def _parse_ossf_signature(text: str, *, source: str) -> tuple[str, bytes, dict]:
    try:
        bundle = json.loads(text)
        env = bundle["dsseEnvelope"]
        payload_type = env["payloadType"]
        payload = base64.b64decode(env["payload"], validate=True)
        if not env["signatures"]:
            raise ValueError("no signatures in dsseEnvelope")
        statement = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{source}: not valid JSON ({exc})") from None
    except KeyError as exc:
        raise ManifestError(f"{source}: missing field {exc.args[0]!r} of the OpenSSF signature bundle") from None
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{source}: malformed OpenSSF signature bundle ({exc})") from None
    if payload_type != _DSSE_PAYLOAD_TYPE:
        raise ManifestError(f"{source}: payloadType {payload_type!r} is not {_DSSE_PAYLOAD_TYPE!r}")
    if not isinstance(statement, dict) or "predicate" not in statement or "subject" not in statement:
        raise ManifestError(f"{source}: the signed statement lacks 'subject' or 'predicate'")
    return payload_type, payload, statement


def _resources(statement: dict, *, source: str) -> dict[str, str]:
    try:
        ser = statement["predicate"]["serialization"]
        if ser.get("method") != "files" or ser.get("hash_type") != "sha256":
            raise ManifestError(
                f"{source}: unsupported serialization {ser.get('method')!r}/{ser.get('hash_type')!r} "
                "(expected files/sha256)"
            )
        return {r["name"]: r["digest"] for r in statement["predicate"]["resources"] if r["algorithm"] == "sha256"}
    except (KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{source}: malformed manifest in the signed statement ({exc!r})") from None


def read_manifest(path: str | os.PathLike) -> dict[str, str]:
    """Relative path -> SHA-256 of every file listed in ``PATH/model.sig`` (no verification)."""
    model = _model_dir(path)
    sig_path = model / SIGNATURE_FILENAME
    if not sig_path.is_file():
        raise ManifestError(f"{sig_path}: missing; the model is not signed (run `dsv41 release manifest`)")
    _, _, statement = _parse_ossf_signature(sig_path.read_text(encoding="utf-8"), source=str(sig_path))
    return _resources(statement, source=str(sig_path))


def _trusted_from_env() -> set[str]:
    raw = os.environ.get(TRUSTED_SIGNERS_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


# ---------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------


def verify_model_dir(
    path: str | os.PathLike,
    *,
    public_identity: PublicIdentity | None = None,
    trusted_fingerprints: Iterable[str] | None = None,
) -> ManifestInfo:
    """Verify ``model.sig`` + ``model.sig.pq.json`` and the files of ``path``.

    Raises :class:`ManifestError` (signature missing, malformed, invalid or from an untrusted
    signer) or :class:`ManifestMismatch` (naming each missing / extra / changed file).
    Returns a :class:`ManifestInfo` on success.
    """
    import model_signing

    model = _model_dir(path)
    sig_path = model / SIGNATURE_FILENAME
    cosig_path = model / COSIGNATURE_FILENAME
    for p in (sig_path, cosig_path):
        if not p.is_file():
            raise ManifestError(f"{p}: missing; the model is not signed (run `dsv41 release manifest`)")
    payload_type, payload, statement = _parse_ossf_signature(sig_path.read_text(encoding="utf-8"), source=str(sig_path))
    expected = _resources(statement, source=str(sig_path))

    try:
        cosig = json.loads(cosig_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{cosig_path}: not valid JSON ({exc})") from None
    if not isinstance(cosig, dict) or cosig.get("format") != COSIGNATURE_FORMAT:
        raise ManifestError(f"{cosig_path}: field 'format' must be {COSIGNATURE_FORMAT!r}")
    for key in ("signer_identity", "hybrid_signature"):
        if key not in cosig:
            raise ManifestError(f"{cosig_path}: missing field {key!r}")
    try:
        signer = PublicIdentity.from_dict(cosig["signer_identity"], source=f"{cosig_path} field 'signer_identity'")
    except IdentityError as exc:
        raise ManifestError(str(exc)) from None

    # Who signed: pinned identity / fingerprints, else the recorded key (integrity only).
    pinned = False
    notes: list[str] = []
    trusted = set(trusted_fingerprints or ()) | _trusted_from_env()
    if public_identity is not None:
        trusted.add(public_identity.fingerprint)
    if trusted:
        if signer.fingerprint not in trusted:
            raise ManifestError(
                f"{cosig_path}: signed by {signer.name!r} ({signer.fingerprint}), which is not a trusted signer "
                f"({', '.join(sorted(trusted))})"
            )
        pinned = True
    else:
        notes.append(
            f"signer not pinned: the files match what {signer.name!r} ({signer.fingerprint}) signed; pass "
            f"--identity or set {TRUSTED_SIGNERS_ENV} to require a specific signer"
        )

    try:
        verify(dsse_pae(payload_type, payload), cosig["hybrid_signature"], signer, context=MANIFEST_CONTEXT)
    except SignatureError as exc:
        raise ManifestError(f"{cosig_path}: hybrid (Ed25519 + ML-DSA-65) co-signature does not verify: {exc}") from None

    # The OpenSSF signature, with the same identity's ECDSA key; model-signing also re-hashes
    # the directory and compares it with the signed manifest.
    with tempfile.TemporaryDirectory(prefix="dsv41-verify-") as tmp:
        pub_pem = Path(tmp) / "ecdsa-p256.pub.pem"
        pub_pem.write_bytes(signer.public_pem(ECDSA_P256))
        try:
            (
                model_signing.verifying.Config()
                .use_elliptic_key_verifier(public_key=pub_pem)
                .set_hashing_config(_signed_hashing_config(statement))
                .verify(model, sig_path)
            )
        except ValueError as exc:
            if str(exc).startswith("Signature mismatch"):
                raise _mismatch(model, statement, expected) from None
            raise ManifestError(f"{sig_path}: OpenSSF model signature does not verify: {exc}") from None
        except Exception as exc:  # InvalidSignature, protobuf / bundle parse errors
            detail = str(exc) or type(exc).__name__
            raise ManifestError(f"{sig_path}: OpenSSF model signature does not verify: {detail}") from None
    return ManifestInfo(
        path=model,
        files=expected,
        signer=signer,
        pinned=pinned,
        root_digest=statement["subject"][0]["digest"]["sha256"],
        notes=notes,
    )


def _signed_hashing_config(statement: dict):
    """The hashing configuration recorded in the signed statement.

    (model-signing 1.1's own guess drops ``allow_symlinks``, which breaks verification of
    Hugging Face cache snapshots, whose files are symlinks.)
    """
    ser = statement["predicate"]["serialization"]
    return _hashing_config(
        ignore_paths=ser.get("ignore_paths", IGNORED_PATHS), allow_symlinks=bool(ser.get("allow_symlinks", False))
    )


def _mismatch(model: Path, statement: dict, expected: dict[str, str]) -> ManifestMismatch:
    config = _signed_hashing_config(statement)
    actual = {rd.identifier: rd.digest.digest_hex for rd in config.hash(model).resource_descriptors()}
    missing = set(expected) - set(actual)
    extra = set(actual) - set(expected)
    changed = {name for name in set(expected) & set(actual) if expected[name] != actual[name]}
    return ManifestMismatch(model, missing, extra, changed)
