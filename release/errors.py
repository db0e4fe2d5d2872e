"""Exceptions of ``dsv41.release``; every message names the file (and field or chunk) at fault."""


class ReleaseError(Exception):
    """Base class of all release-tooling errors."""


class ManifestError(ReleaseError):
    """A model directory's signed manifest is missing, malformed, untrusted or does not verify."""


class ManifestMismatch(ManifestError):
    """The files of a model directory differ from its signed manifest.

    ``missing``, ``extra`` and ``changed`` list the relative paths (sorted).
    """

    def __init__(self, path, missing, extra, changed):
        self.path = str(path)
        self.missing = sorted(missing)
        self.extra = sorted(extra)
        self.changed = sorted(changed)
        lines = [f"{self.path}: files do not match the signed manifest (model.sig)"]
        lines += [f"  missing: {name}" for name in self.missing]
        lines += [f"  extra:   {name}" for name in self.extra]
        lines += [f"  changed: {name}" for name in self.changed]
        super().__init__("\n".join(lines))


class DecryptionError(ReleaseError):
    """An encrypted file cannot be decrypted: tampered, truncated, reordered or not for this key."""


class CardInputError(ReleaseError):
    """An evals or audit report given to ``release card`` lacks a field the card needs."""


class PushRefused(ReleaseError):
    """``release push`` refused to upload (e.g. the manifest does not verify)."""
