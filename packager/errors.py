"""Error types of the build host only (model sources, conda environments).

They derive from the shared classes in :mod:`installer.errors` (:class:`~installer.errors.LlmPackError`
and the builtins), so ``pack``'s CLI catches them, prints them and picks their exit code exactly as it
does for every other error the tool raises on purpose. The installer never raises them.
"""

from __future__ import annotations

from installer.errors import LlmPackError


class SourceError(LlmPackError):
    """A model source (hub, local dir) failed: unknown repo/revision, auth, network."""


class NotFoundError(SourceError, FileNotFoundError):
    """A repo, revision or file does not exist at the source."""


class AuthError(SourceError, PermissionError):
    """The source refused access (gated or private repo)."""


class EnvironmentBuildError(LlmPackError):
    """Solving, installing or packing a conda environment failed."""
