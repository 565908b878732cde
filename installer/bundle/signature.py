"""Checking the ed25519 signature over MANIFEST.json (``cryptography`` when present, else ``openssl``).

Signing lives on the build host (packager/signing.py); the target only verifies.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from pathlib import Path

from installer.errors import SignatureError


def verify_signature(message: bytes, signature: bytes, pubkey_pem: bytes) -> bool:
    """True if ``signature`` is a valid ed25519 signature of ``message`` by ``pubkey_pem``."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        return _verify_with_openssl(message, signature, pubkey_pem)
    try:
        key = load_pem_public_key(pubkey_pem)
    except ValueError as e:
        raise SignatureError(f"not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("the public key is not an ed25519 key", hint="create keys with `pack keygen`")
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _verify_with_openssl(message: bytes, signature: bytes, pubkey_pem: bytes) -> bool:
    with tempfile.TemporaryDirectory(prefix="llm-sig-") as d:
        paths = {n: Path(d, n) for n in ("msg", "sig", "key.pub")}
        paths["msg"].write_bytes(message)
        paths["sig"].write_bytes(signature)
        paths["key.pub"].write_bytes(pubkey_pem)
        r = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(paths["key.pub"]),
                            "-rawin", "-in", str(paths["msg"]), "-sigfile", str(paths["sig"])],
                           capture_output=True, check=False)
    return r.returncode == 0


def key_fingerprint(pubkey_pem: bytes) -> str:
    """Short, stable fingerprint of a PEM public key (sha256 of the DER bytes, first 16 hex)."""
    lines = [ln.strip() for ln in pubkey_pem.decode("ascii", "replace").splitlines()]
    body = "".join(ln for ln in lines if ln and not ln.startswith("-----"))
    import base64
    try:
        der = base64.b64decode(body, validate=True)
    except ValueError as e:
        raise SignatureError(f"not a PEM public key: {e}") from e
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]
