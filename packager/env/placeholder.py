"""Restore the package's prefix placeholder in binary files an installer rewrote (streaming)."""

from __future__ import annotations

RESTORE_MAX_STRING = 16 << 20  # bytes of one C string holding the prefix kept while looking for its NUL


class PlaceholderRestorer:
    """Streaming :func:`restore_placeholder`: ``feed(chunk) -> bytes`` then ``finish() -> bytes``.

    Memory stays at about one chunk plus the C string being rewritten (at most ``RESTORE_MAX_STRING``):
    outside a string only ``len(installed) - 1`` bytes are kept back (a prefix cut by a chunk boundary).
    The output has exactly the input's length. Raises ValueError where the one-shot version does.
    """

    def __init__(self, installed: bytes, placeholder: bytes) -> None:
        self.extra = len(placeholder) - len(installed)
        if self.extra < 0:
            raise ValueError("placeholder shorter than the installed prefix")
        if not installed or b"\0" in installed:
            raise ValueError("the installed prefix must be a non-empty C string")
        self.installed, self.placeholder = installed, placeholder
        self.pending = bytearray()  # unprocessed input
        self.string: bytearray | None = None  # original bytes of the C string being rewritten (from the prefix)
        self.absorb = 0  # NUL padding still to be dropped after a rewritten string
        self.offset = 0  # input offset of pending[0]

    def feed(self, chunk: bytes) -> bytes:
        self.pending += chunk
        return self._run(final=False)

    def finish(self) -> bytes:
        out = self._run(final=True)
        if self.absorb:
            raise ValueError(f"no NUL padding after the prefix at offset {self._string_start}")
        if self.string is not None:  # a prefix with no NUL after it before the end: left as it is
            out += bytes(self.string)
            self.string = None
        return out

    def _run(self, *, final: bool) -> bytes:
        out = bytearray()
        data, inst = self.pending, self.installed
        i = 0
        while i < len(data):
            if self.absorb:
                take = min(self.absorb, len(data) - i)
                if data[i:i + take].count(0) != take:
                    raise ValueError(f"no NUL padding after the prefix at offset {self._string_start}")
                self.absorb -= take
                i += take
                continue
            if self.string is not None:
                nul = data.find(b"\0", i)
                end = len(data) if nul < 0 else nul + 1
                self.string += data[i:end]
                i = end
                if nul >= 0:
                    s = bytes(self.string)
                    out += s.replace(inst, self.placeholder)
                    self.absorb = self.extra * s.count(inst)
                    self.string = None
                elif len(self.string) > RESTORE_MAX_STRING:
                    raise ValueError(f"the string holding the prefix at offset {self._string_start} is longer "
                                     f"than {RESTORE_MAX_STRING} bytes without a NUL")
                continue
            hit = data.find(inst, i)
            if hit < 0:
                keep = 0 if final else min(len(inst) - 1, len(data) - i)
                out += data[i:len(data) - keep]
                i = len(data) - keep
                break
            out += data[i:hit]
            self._string_start = self.offset + hit
            self.string = bytearray()
            i = hit
        self.offset += i
        del data[:i]
        return bytes(out)


def restore_placeholder(data: bytes, installed: bytes, placeholder: bytes) -> bytes:
    """Undo an installer's binary prefix replacement: ``installed`` + rest of the C string + NUL padding
    becomes ``placeholder`` + rest + NUL again (same length), as in the package. (One-shot form of
    :class:`PlaceholderRestorer`, which the packer streams files through.)"""
    r = PlaceholderRestorer(installed, placeholder)
    return r.feed(data) + r.finish()

