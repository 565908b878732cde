"""THE bundle format: on-disk names, typed MANIFEST records, hashing, signature checks, the reader.

``from installer.bundle import Bundle, MANIFEST_NAME, ...`` is the public face; the modules are
names.py (every on-disk name), manifest/ (the MANIFEST.json records, the one schema), hashing.py,
signature.py and reader.py. Writing bundles is build-only: packager/bundle_writer.py.
"""

from installer.bundle.hashing import HashCancelled, hash_files, sha256_file
from installer.bundle.names import (
    ARTIFACT_KINDS,
    BUFSIZE,
    ENVS_DIR,
    FORMAT_VERSION,
    INSTALL_SH,
    INSTALLER_ARCHIVE,
    MANIFEST_NAME,
    MODELS_DIR,
    PIECE_SUFFIX,
    RUNTIME_DIR,
    SIGNATURE_NAME,
    SPLIT_INFO,
    TRUSTED_KEYS,
    VOLUME_INDEX,
    VOLUME_PREFIX,
    bundle_dirname,
    env_artifact,
    model_dir,
    runtime_artifact,
)
from installer.bundle.reader import Artifact, Bundle, canonical_json, check_relpath
from installer.bundle.signature import key_fingerprint, verify_signature

__all__ = [
    "ARTIFACT_KINDS", "BUFSIZE", "ENVS_DIR", "FORMAT_VERSION", "INSTALL_SH", "INSTALLER_ARCHIVE", "MANIFEST_NAME",
    "MODELS_DIR", "PIECE_SUFFIX", "RUNTIME_DIR", "SIGNATURE_NAME", "SPLIT_INFO", "TRUSTED_KEYS", "VOLUME_INDEX",
    "VOLUME_PREFIX", "Artifact", "Bundle", "HashCancelled", "bundle_dirname", "canonical_json", "check_relpath",
    "env_artifact", "hash_files", "key_fingerprint", "model_dir", "runtime_artifact", "sha256_file",
    "verify_signature",
]
