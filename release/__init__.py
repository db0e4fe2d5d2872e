"""dsv41.release: publishing the open weights responsibly.

* :mod:`dsv41.release.identity`   - hybrid Ed25519 + ML-DSA-65 identities (``dsv41 keys``) and the
  sign / verify API shared with ``dsv41 audit sign/verify``;
* :mod:`dsv41.release.manifest`   - OpenSSF Model Signing manifest + post-quantum co-signature
  (``dsv41 release manifest/verify``; ``verify_model_dir`` is what loaders call);
* :mod:`dsv41.release.encryption` - AES-256-GCM chunked encryption with ML-KEM-768 key wrapping
  (``dsv41 release encrypt/decrypt``);
* :mod:`dsv41.release.card`       - the model card (``dsv41 release card``);
* :mod:`dsv41.release.push`       - verified upload to the Hub (``dsv41 release push``).
"""

from dsv41.release.errors import (
    CardInputError,
    DecryptionError,
    ManifestError,
    ManifestMismatch,
    PushRefused,
    ReleaseError,
)
from dsv41.release.identity import (
    Identity,
    IdentityError,
    PublicIdentity,
    SignatureError,
    verify,
)
from dsv41.release.manifest import sign_model_dir, verify_model_dir

__all__ = [
    "CardInputError",
    "DecryptionError",
    "Identity",
    "IdentityError",
    "ManifestError",
    "ManifestMismatch",
    "PublicIdentity",
    "PushRefused",
    "ReleaseError",
    "SignatureError",
    "sign_model_dir",
    "verify",
    "verify_model_dir",
]
