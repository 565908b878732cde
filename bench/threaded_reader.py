"""A reader thread in front of extraction (read + hash + decompress overlap with file creation).

Bench-only (bench/extract_env.py ``--read-ahead``): the installer extracts with the plain reader, so
this does not ship in installer.tar.gz. Pass the class as
``extract_archive(..., read_ahead=ThreadedReader)``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from installer.unpack.source import _Plain


class ThreadedReader(_Plain):
    """:class:`_Plain` fed by a producer thread (read + hash + decompress overlap with extraction).

    Exceptions in the producer are re-raised in the consumer.
    """

    def __init__(self, produce: Callable[[], bytes], depth: int = 16) -> None:
        super().__init__(produce)
        self._q: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-extract-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._produce()
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # handed over to the consumer
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next(self) -> bytes:
        item = self._q.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
