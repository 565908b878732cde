"""Error types of the installer, and the base classes the packager shares (packager/errors.py adds its own).

Every error the tool raises on purpose derives from :class:`LlmPackError`. Subclasses also
inherit the matching builtin so callers can catch them naturally, and they carry data
(paths, expected/actual hashes) rather than only a string. The CLIs turn them into a
one-paragraph message and an exit code; a traceback is only ever shown for a bug.
"""

from __future__ import annotations


class LlmPackError(Exception):
    """Root of all errors the tool raises deliberately. ``hint`` says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message

    def __reduce__(self):  # picklable whatever a subclass's __init__ takes (errors cross process pools)
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type, args: tuple, state: dict) -> LlmPackError:
    e = cls.__new__(cls)
    Exception.__init__(e, *args)
    e.__dict__.update(state)
    return e


class UsageError(LlmPackError, ValueError):
    """Bad input from the user (arguments, manifest values)."""

    exit_code = 2


class BundleError(LlmPackError, ValueError):
    """A bundle is malformed (missing MANIFEST.json, unknown format version, unlisted file...)."""


class IntegrityError(BundleError):
    """A file's size or sha256 does not match what MANIFEST.json lists."""

    def __init__(self, path: str, *, expected: str, actual: str, what: str = "sha256",
                 hint: str | None = None) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        self.what = what
        super().__init__(
            f"{path}: {what} mismatch (expected {expected}, got {actual})",
            hint=hint or "the file is corrupt or was modified; copy the bundle again from the "
            "build host (or re-run the build)",
        )


class SignatureError(BundleError):
    """MANIFEST.json's signature is missing, invalid or made by an untrusted key."""


class UnsafeArchiveError(BundleError):
    """An archive member would escape the destination or is not allowed (device, setuid...)."""

    def __init__(self, archive: str, member: str, reason: str) -> None:
        self.archive = archive
        self.member = member
        self.reason = reason
        super().__init__(f"{archive}: refusing member {member!r}: {reason}",
                         hint="the archive was not produced by `pack build`; do not install it")


class PreflightError(LlmPackError):
    """One or more preflight checks failed on the target."""


class InstallError(LlmPackError):
    """Installing, activating or rolling back failed (the previous version is kept)."""
