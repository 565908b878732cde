"""Model sources: one module per source, one small interface (see :mod:`packager.sources.base`).

    source = get_source(spec.source)
    pinned = source.resolve(spec)                 # PinnedModel: commit + files with size/sha256
    blobs = source.fetch(pinned, store, jobs=4)   # {path: verified file: a store blob, or the local file}
    pinned = pinned.with_hashes(blobs)            # fills sha256 the hub did not list (HF non-LFS files)

Hub clients are imported only when their source is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from installer.errors import UsageError

if TYPE_CHECKING:
    from packager.sources.base import Source
    from packager.store import ContentStore

SOURCES = ("huggingface", "modelscope", "local")


def get_source(name: str, *, store: ContentStore | None = None, jobs: int | None = None,
               progress: bool = False, defer_hash: bool = False) -> Source:
    """The source called ``name``. The local source hashes while it resolves: ``store`` keeps its stat
    cache, ``jobs`` hashing threads, ``progress`` shows a bar (the hub sources resolve with API calls only);
    ``defer_hash`` leaves files the stat cache does not know unhashed ("") for the build to hash in the
    bundle."""
    if name == "huggingface":
        from packager.sources.huggingface import HuggingFaceSource

        return HuggingFaceSource()
    if name == "modelscope":
        from packager.sources.modelscope import ModelScopeSource

        return ModelScopeSource()
    if name == "local":
        from packager.sources.local import LocalSource

        return LocalSource(store=store, jobs=jobs, progress=progress, defer_hash=defer_hash)
    raise UsageError(f"unknown model source {name!r}", hint=f"use one of: {', '.join(SOURCES)}")
