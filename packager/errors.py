"""Error types of the build host only (manifests, model sources, conda environments).

They derive from the shared classes in :mod:`installer.errors` (:class:`~installer.errors.LlmPackError`
and the builtins), so ``pack``'s CLI catches them, prints them and picks their exit code exactly as it
does for every other error the tool raises on purpose. The installer never raises them.
"""

from __future__ import annotations

from installer.errors import LlmPackError, UsageError


class SourceError(LlmPackError):
    """A model source (hub, local dir) failed: unknown repo/revision, auth, network."""


class NotFoundError(SourceError, FileNotFoundError):
    """A repo, revision or file does not exist at the source."""


class AuthError(SourceError, PermissionError):
    """The source refused access (gated or private repo)."""


class EnvironmentBuildError(LlmPackError):
    """Solving, installing or packing a conda environment failed."""


class ManifestError(UsageError):
    """The YAML manifest is invalid. ``problems`` lists every problem found (build host only)."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s) in the manifest:\n{body}")
