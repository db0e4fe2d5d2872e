"""Hybrid signing identities: Ed25519 + ML-DSA-65 (FIPS 204), plus the keys a release needs.

An *identity* is one person's (an auditor's, a release manager's) set of key pairs, all made
with the ``cryptography`` package:

* ``ed25519``    - classical signature key;
* ``ml-dsa-65``  - post-quantum signature key (FIPS 204);
* ``ecdsa-p256`` - the key the OpenSSF Model Signing format (``model-signing`` package,
  "key" method) signs model manifests with; that format accepts only NIST EC curves, so the
  hybrid pair co-signs the same payload (see ``dsv41.release.manifest``);
* ``ml-kem-768`` - post-quantum KEM key (FIPS 203) that encrypted weights are wrapped to.

A hybrid signature (:meth:`Identity.sign`) carries an Ed25519 *and* an ML-DSA-65 signature
over the same message and is valid only if **both** verify (:func:`verify`).

Files written by :meth:`Identity.save` (``dsv41 keys new``)::

    DIR/identity.pub.json   public identity: share it; verifiers pin its fingerprint
    DIR/identity.key.json   private keys, encrypted with a passphrase (scrypt + AES-256-GCM),
                            file mode 0600; it also holds the public identity

Python API (used by ``dsv41 audit sign/verify`` and ``dsv41 release``)::

    from dsv41.release.identity import Identity, PublicIdentity, verify, SignatureError

    ident = Identity.generate(name="alice")
    ident.save("~/.dsv41/identity", passphrase="...")        # -> (pub_path, key_path)
    ident = Identity.load("~/.dsv41/identity/identity.key.json", passphrase="...")
    bundle = ident.sign(payload_bytes, context="dsv41/audit-report/v1")   # JSON-serialisable dict
    pub = PublicIdentity.load("alice/identity.pub.json")    # or PublicIdentity.from_dict(d)
    verify(payload_bytes, bundle, pub, context="dsv41/audit-report/v1")  # raises SignatureError
    pub.fingerprint                                         # "sha256:<hex>" over all public keys

``context`` is a domain-separation label (1-200 ASCII characters): a signature made for one
context never verifies under another, so an audit-report signature cannot be replayed as a
release-manifest signature. :func:`canonical_json` gives the byte encoding to sign JSON with.

Signed message (both algorithms sign the same bytes)::

    M = "dsv41-hybrid-signature/v1" || lp(context) || lp(signer fingerprint) || lp(payload)

where ``lp(x)`` is the 8-byte big-endian length of ``x`` followed by ``x``; ML-DSA-65 is
additionally given the FIPS 204 context string ``b"dsv41-hybrid-v1"``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, mlkem
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from dsv41.release.errors import ReleaseError

PUBLIC_FORMAT = "dsv41-identity/v1"
PRIVATE_FORMAT = "dsv41-identity-private/v1"
SIGNATURE_FORMAT = "dsv41-hybrid-signature/v1"
PUBLIC_FILENAME = "identity.pub.json"
PRIVATE_FILENAME = "identity.key.json"

ED25519 = "ed25519"
MLDSA65 = "ml-dsa-65"
ECDSA_P256 = "ecdsa-p256"
MLKEM768 = "ml-kem-768"
KEY_ALGORITHMS = (ED25519, MLDSA65, ECDSA_P256, MLKEM768)
SIGNATURE_ALGORITHMS = (ED25519, MLDSA65)

_MLDSA_CONTEXT = b"dsv41-hybrid-v1"
DEFAULT_SCRYPT_N = 2**17  # 128 MiB, ~0.5 s: slows passphrase guessing
_SCRYPT_R = 8
_SCRYPT_P = 1

_PUBLIC_TYPES = {
    ED25519: ed25519.Ed25519PublicKey,
    MLDSA65: mldsa.MLDSA65PublicKey,
    ECDSA_P256: ec.EllipticCurvePublicKey,
    MLKEM768: mlkem.MLKEM768PublicKey,
}
_PRIVATE_TYPES = {
    ED25519: ed25519.Ed25519PrivateKey,
    MLDSA65: mldsa.MLDSA65PrivateKey,
    ECDSA_P256: ec.EllipticCurvePrivateKey,
    MLKEM768: mlkem.MLKEM768PrivateKey,
}


class IdentityError(ReleaseError):
    """A key file is missing, malformed, tampered with, or the passphrase is wrong."""


class SignatureError(ReleaseError):
    """A hybrid signature does not verify; the message says which part failed."""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes to sign: sorted keys, no whitespace, UTF-8, no NaN/Infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"{what}: not valid base64 ({exc})") from None


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    if isinstance(passphrase, str):
        passphrase = passphrase.encode("utf-8")
    if not isinstance(passphrase, bytes) or not passphrase:
        raise IdentityError("an empty passphrase is not allowed for private keys")
    return passphrase


def _check_context(context: str) -> bytes:
    if not isinstance(context, str) or not (1 <= len(context) <= 200) or not context.isascii():
        raise ValueError(f"signature context must be 1-200 ASCII characters, got {context!r}")
    return context.encode("ascii")


def _signed_message(context: str, fingerprint: str, payload: bytes) -> bytes:
    return (
        SIGNATURE_FORMAT.encode("ascii")
        + _lp(_check_context(context))
        + _lp(fingerprint.encode("ascii"))
        + _lp(bytes(payload))
    )


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _fingerprint(public_der: dict[str, bytes]) -> str:
    doc = {alg: _b64(public_der[alg]) for alg in KEY_ALGORITHMS}
    return "sha256:" + hashlib.sha256(b"dsv41-identity-fingerprint/v1\n" + canonical_json(doc)).hexdigest()


def _read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IdentityError(f"{what} not found: {path}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IdentityError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise IdentityError(f"{path}: expected a JSON object")
    return doc


# ---------------------------------------------------------------------------------------------
# public identity
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicIdentity:
    """The public half of an identity; what a verifier needs (and pins by ``fingerprint``)."""

    name: str
    fingerprint: str
    keys: dict[str, Any] = field(repr=False)  # algorithm -> cryptography public key object
    created: str | None = None

    @property
    def ed25519(self) -> ed25519.Ed25519PublicKey:
        return self.keys[ED25519]

    @property
    def mldsa65(self) -> mldsa.MLDSA65PublicKey:
        return self.keys[MLDSA65]

    @property
    def ecdsa_p256(self) -> ec.EllipticCurvePublicKey:
        return self.keys[ECDSA_P256]

    @property
    def mlkem768(self) -> mlkem.MLKEM768PublicKey:
        return self.keys[MLKEM768]

    def public_pem(self, algorithm: str) -> bytes:
        """SubjectPublicKeyInfo PEM of one key (e.g. ECDSA_P256 for ``model_signing verify key``)."""
        return self.keys[algorithm].public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def kem_key_id(self) -> str:
        """Identifier of the ML-KEM-768 key (what encrypted files list as recipient)."""
        return kem_key_id(self.mlkem768)

    def to_dict(self) -> dict:
        return {
            "format": PUBLIC_FORMAT,
            "name": self.name,
            "created": self.created,
            "fingerprint": self.fingerprint,
            "public_keys": {alg: _b64(_public_der(self.keys[alg])) for alg in KEY_ALGORITHMS},
        }

    @classmethod
    def from_dict(cls, doc: Any, *, source: str = "public identity") -> PublicIdentity:
        """Parse and check a public identity; the stated fingerprint must match the keys."""
        if not isinstance(doc, dict):
            raise IdentityError(f"{source}: expected a JSON object")
        if doc.get("format") not in (PUBLIC_FORMAT, PRIVATE_FORMAT):
            raise IdentityError(f"{source}: field 'format' must be {PUBLIC_FORMAT!r}, got {doc.get('format')!r}")
        raw = doc.get("public_keys")
        if not isinstance(raw, dict):
            raise IdentityError(f"{source}: missing field 'public_keys'")
        keys: dict[str, Any] = {}
        ders: dict[str, bytes] = {}
        for alg in KEY_ALGORITHMS:
            if alg not in raw:
                raise IdentityError(f"{source}: missing field 'public_keys.{alg}'")
            try:
                der = _unb64(raw[alg], f"public_keys.{alg}")
                key = serialization.load_der_public_key(der)
            except ValueError as exc:
                raise IdentityError(f"{source}: field 'public_keys.{alg}' is not a valid public key ({exc})") from None
            if not isinstance(key, _PUBLIC_TYPES[alg]) or (
                alg == ECDSA_P256 and not isinstance(key.curve, ec.SECP256R1)
            ):
                raise IdentityError(f"{source}: field 'public_keys.{alg}' holds a {type(key).__name__}, not {alg}")
            keys[alg] = key
            ders[alg] = der
        extra = sorted(set(raw) - set(KEY_ALGORITHMS))
        if extra:
            raise IdentityError(f"{source}: unknown keys in 'public_keys': {', '.join(extra)}")
        fingerprint = _fingerprint(ders)
        if doc.get("fingerprint") != fingerprint:
            raise IdentityError(
                f"{source}: field 'fingerprint' ({doc.get('fingerprint')!r}) does not match its public keys "
                f"({fingerprint}); the identity file was altered"
            )
        return cls(name=str(doc.get("name") or ""), fingerprint=fingerprint, keys=keys, created=doc.get("created"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PublicIdentity:
        """Load ``identity.pub.json`` (a directory holding it, or ``identity.key.json``, also work)."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / PUBLIC_FILENAME
        return cls.from_dict(_read_json(path, "public identity"), source=str(path))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path).expanduser()
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def verify(self, payload: bytes, bundle: dict, *, context: str) -> None:
        verify(payload, bundle, self, context=context)


def kem_key_id(public_key: mlkem.MLKEM768PublicKey) -> str:
    return "sha256:" + hashlib.sha256(public_key.public_bytes_raw()).hexdigest()


# ---------------------------------------------------------------------------------------------
# private identity
# ---------------------------------------------------------------------------------------------


class Identity:
    """A full identity with private keys. Create with :meth:`generate`, persist with :meth:`save`."""

    def __init__(self, name: str, private_keys: dict[str, Any], created: str | None = None):
        missing = [alg for alg in KEY_ALGORITHMS if alg not in private_keys]
        if missing:
            raise IdentityError(f"identity {name!r} lacks private keys: {', '.join(missing)}")
        self._keys = dict(private_keys)
        ders = {alg: _public_der(self._keys[alg].public_key()) for alg in KEY_ALGORITHMS}
        self.public = PublicIdentity(
            name=name,
            fingerprint=_fingerprint(ders),
            keys={alg: self._keys[alg].public_key() for alg in KEY_ALGORITHMS},
            created=created,
        )

    def __repr__(self) -> str:
        return f"Identity(name={self.name!r}, fingerprint={self.fingerprint!r})"

    @property
    def name(self) -> str:
        return self.public.name

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    @classmethod
    def generate(cls, name: str = "") -> Identity:
        keys = {
            ED25519: ed25519.Ed25519PrivateKey.generate(),
            MLDSA65: mldsa.MLDSA65PrivateKey.generate(),
            ECDSA_P256: ec.generate_private_key(ec.SECP256R1()),
            MLKEM768: mlkem.MLKEM768PrivateKey.generate(),
        }
        created = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        return cls(name, keys, created)

    # -- signing -----------------------------------------------------------------------------

    def sign(self, payload: bytes, *, context: str) -> dict:
        """Hybrid signature bundle (a JSON-serialisable dict) over ``payload``.

        Bundle fields: ``format``, ``context``, ``signer`` (identity fingerprint),
        ``payload_sha256`` (hex, for clear error messages), ``signatures`` (``ed25519`` and
        ``ml-dsa-65``, base64).
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__} (use canonical_json for objects)")
        payload = bytes(payload)
        message = _signed_message(context, self.fingerprint, payload)
        return {
            "format": SIGNATURE_FORMAT,
            "context": context,
            "signer": self.fingerprint,
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "signatures": {
                ED25519: _b64(self._keys[ED25519].sign(message)),
                MLDSA65: _b64(self._keys[MLDSA65].sign(message, _MLDSA_CONTEXT)),
            },
        }

    def sign_json(self, obj: Any, *, context: str) -> dict:
        """:meth:`sign` over :func:`canonical_json` of ``obj``."""
        return self.sign(canonical_json(obj), context=context)

    # -- access to single keys for the release tooling ----------------------------------------

    def private_key(self, algorithm: str) -> Any:
        return self._keys[algorithm]

    def ecdsa_pem(self, password: bytes) -> bytes:
        """The ECDSA P-256 key as PKCS#8 PEM encrypted with ``password`` (for ``model-signing``)."""
        return self._keys[ECDSA_P256].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )

    def decapsulate(self, kem_ciphertext: bytes) -> bytes:
        """ML-KEM-768 decapsulation (shared secret) for encrypted weights."""
        return self._keys[MLKEM768].decapsulate(kem_ciphertext)

    # -- persistence --------------------------------------------------------------------------

    def to_private_dict(self, passphrase: str | bytes, *, scrypt_n: int | None = None) -> dict:
        secret = _passphrase_bytes(passphrase)
        scrypt_n = scrypt_n or DEFAULT_SCRYPT_N
        plain = {
            alg: _b64(
                self._keys[alg].private_bytes(
                    serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            for alg in KEY_ALGORITHMS
        }
        salt = secrets.token_bytes(16)
        nonce = secrets.token_bytes(12)
        kek = Scrypt(salt=salt, length=32, n=scrypt_n, r=_SCRYPT_R, p=_SCRYPT_P).derive(secret)
        ciphertext = AESGCM(kek).encrypt(nonce, canonical_json(plain), _private_aad(self.fingerprint))
        doc = self.public.to_dict()
        doc["format"] = PRIVATE_FORMAT
        doc["encrypted_private_keys"] = {
            "kdf": {"name": "scrypt", "n": scrypt_n, "r": _SCRYPT_R, "p": _SCRYPT_P, "salt": _b64(salt)},
            "cipher": "AES-256-GCM",
            "nonce": _b64(nonce),
            "ciphertext": _b64(ciphertext),
        }
        return doc

    def save(
        self,
        directory: str | os.PathLike,
        passphrase: str | bytes,
        *,
        overwrite: bool = False,
        scrypt_n: int | None = None,
    ) -> tuple[Path, Path]:
        """Write ``identity.pub.json`` and ``identity.key.json`` (mode 0600) into ``directory``."""
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        pub_path, key_path = directory / PUBLIC_FILENAME, directory / PRIVATE_FILENAME
        if not overwrite:
            for p in (pub_path, key_path):
                if p.exists():
                    raise IdentityError(f"{p} already exists; refusing to overwrite an identity (use overwrite/--force)")
        data = (json.dumps(self.to_private_dict(passphrase, scrypt_n=scrypt_n), indent=2) + "\n").encode("utf-8")
        tmp = key_path.with_name(key_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, key_path)
        self.public.save(pub_path)
        return pub_path, key_path

    @classmethod
    def from_private_dict(cls, doc: Any, passphrase: str | bytes, *, source: str = "private identity") -> Identity:
        if not isinstance(doc, dict) or doc.get("format") != PRIVATE_FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else None
            raise IdentityError(f"{source}: field 'format' must be {PRIVATE_FORMAT!r}, got {got!r}")
        public = PublicIdentity.from_dict(doc, source=source)
        enc = doc.get("encrypted_private_keys")
        if not isinstance(enc, dict):
            raise IdentityError(f"{source}: missing field 'encrypted_private_keys'")
        try:
            kdf = enc["kdf"]
            if kdf.get("name") != "scrypt":
                raise IdentityError(f"{source}: unsupported kdf {kdf.get('name')!r}")
            salt = _unb64(kdf["salt"], "kdf.salt")
            nonce = _unb64(enc["nonce"], "encrypted_private_keys.nonce")
            ciphertext = _unb64(enc["ciphertext"], "encrypted_private_keys.ciphertext")
            n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        except KeyError as exc:
            raise IdentityError(f"{source}: missing field 'encrypted_private_keys.{exc.args[0]}'") from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise IdentityError(f"{source}: malformed 'encrypted_private_keys' ({exc})") from None
        if not (2**10 <= n <= 2**22) or r > 32 or p > 16:
            raise IdentityError(f"{source}: scrypt parameters out of range (n={n}, r={r}, p={p})")
        kek = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(_passphrase_bytes(passphrase))
        try:
            plain = json.loads(AESGCM(kek).decrypt(nonce, ciphertext, _private_aad(public.fingerprint)))
        except InvalidTag:
            raise IdentityError(f"{source}: wrong passphrase, or the encrypted private keys were altered") from None
        keys = {}
        for alg in KEY_ALGORITHMS:
            key = serialization.load_der_private_key(_unb64(plain[alg], alg), password=None)
            if not isinstance(key, _PRIVATE_TYPES[alg]):
                raise IdentityError(f"{source}: private key {alg} has type {type(key).__name__}")
            keys[alg] = key
        ident = cls(public.name, keys, public.created)
        if ident.fingerprint != public.fingerprint:
            raise IdentityError(f"{source}: private keys do not match the public keys in the file")
        return ident

    @classmethod
    def load(cls, path: str | os.PathLike, passphrase: str | bytes) -> Identity:
        """Load ``identity.key.json`` (or the directory holding it) and decrypt it."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / PRIVATE_FILENAME
        return cls.from_private_dict(_read_json(path, "private identity"), passphrase, source=str(path))


def _private_aad(fingerprint: str) -> bytes:
    return (PRIVATE_FORMAT + "\n" + fingerprint).encode("ascii")


# ---------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------


def verify(payload: bytes, bundle: Any, public: PublicIdentity, *, context: str) -> None:
    """Check a hybrid signature bundle; raise :class:`SignatureError` unless BOTH signatures verify.

    The bundle must come from ``public`` (fingerprint match) and carry the expected context.
    """
    if not isinstance(bundle, dict):
        raise SignatureError("signature bundle: expected a JSON object")
    if bundle.get("format") != SIGNATURE_FORMAT:
        raise SignatureError(f"signature bundle: field 'format' must be {SIGNATURE_FORMAT!r}, got {bundle.get('format')!r}")
    if bundle.get("context") != context:
        raise SignatureError(
            f"signature bundle: made for context {bundle.get('context')!r}, expected {context!r}"
        )
    if bundle.get("signer") != public.fingerprint:
        raise SignatureError(
            f"signature bundle: signed by {bundle.get('signer')!r}, expected identity "
            f"{public.name!r} ({public.fingerprint})"
        )
    payload = bytes(payload)
    if bundle.get("payload_sha256") != hashlib.sha256(payload).hexdigest():
        raise SignatureError("signature bundle: the payload differs from the signed one (SHA-256 mismatch)")
    sigs = bundle.get("signatures")
    if not isinstance(sigs, dict):
        raise SignatureError("signature bundle: missing field 'signatures'")
    message = _signed_message(context, public.fingerprint, payload)
    failures = []
    for alg in SIGNATURE_ALGORITHMS:
        if alg not in sigs:
            failures.append(f"{alg} signature missing")
            continue
        try:
            raw = _unb64(sigs[alg], f"signatures.{alg}")
            if alg == ED25519:
                public.ed25519.verify(raw, message)
            else:
                public.mldsa65.verify(raw, message, _MLDSA_CONTEXT)
        except (InvalidSignature, ValueError):
            failures.append(f"{alg} signature invalid")
    if failures:
        raise SignatureError("signature bundle: " + "; ".join(failures) + " (both must verify)")


def is_valid(payload: bytes, bundle: Any, public: PublicIdentity, *, context: str) -> bool:
    """Boolean form of :func:`verify`."""
    try:
        verify(payload, bundle, public, context=context)
    except SignatureError:
        return False
    return True


def default_identity_dir() -> Path:
    """``$DSV41_IDENTITY`` or ``~/.dsv41/identity``."""
    env = os.environ.get("DSV41_IDENTITY")
    return Path(env).expanduser() if env else Path.home() / ".dsv41" / "identity"
