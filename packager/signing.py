"""ed25519 keys and signatures for bundles (`pack keygen`, `pack build --key`).

Private keys are PKCS#8 PEM files written with mode 0600; public keys are SubjectPublicKeyInfo PEM so a
bare server can check a bundle with `openssl pkeyutl -verify -pubin -inkey KEY.pub -rawin ...`.
Verification lives in `installer.bundle` (the target needs it without this module).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from installer.bundle import key_fingerprint
from installer.errors import UsageError


def keygen(prefix: str | Path, *, force: bool = False) -> tuple[Path, Path, str]:
    """Write PREFIX.key (0600) and PREFIX.pub; return their paths and the public key's fingerprint."""
    prefix = Path(prefix)
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (key_path, pub_path):
        if p.exists() and not force:
            raise UsageError(f"{p} already exists", hint="choose another --out prefix, or pass --force to replace it")
    parent = key_path.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{parent} exists and is not a directory",
                         hint=f"choose another --out prefix, or move {parent} away")
    if not parent.is_dir():
        parent.mkdir(mode=0o700, parents=True)  # keys/ in a fresh checkout: private to its owner
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    # both written to temp files first, then renamed: a full disk or Ctrl-C leaves no half key pair behind
    tmp_key = key_path.with_name(f".{key_path.name}.tmp")
    tmp_pub = pub_path.with_name(f".{pub_path.name}.tmp")
    try:
        fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(priv)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp_pub, "wb") as f:
            f.write(pub)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_key, key_path)
        os.replace(tmp_pub, pub_path)
    finally:
        tmp_key.unlink(missing_ok=True)
        tmp_pub.unlink(missing_ok=True)
    return key_path, pub_path, key_fingerprint(pub)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read signing key {path}: {e.strerror}",
                         hint="create one with `pack keygen --out PREFIX` and pass --key PREFIX.key") from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path} is not an unencrypted PEM private key ({e})",
                         hint="pass the .key file written by `pack keygen` (not the .pub)") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an ed25519 key", hint="create one with `pack keygen`")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UsageError(f"{path} is readable by others (mode {mode:o})", hint=f"chmod 600 {path}")
    return key


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def read_pubkeys(paths: list[str | Path]) -> list[bytes]:
    keys = []
    for p in paths:
        try:
            keys.append(Path(p).read_bytes())
        except OSError as e:
            raise UsageError(f"cannot read public key {p}: {e.strerror}") from e
    return keys
