"""Safe extraction and verified copy: every byte hashed on the way, one rule set for archive members.

archive.py (:func:`extract_archive`), frames.py (:func:`extract_frames`, parallel), copy.py
(:func:`copy_verified`), members.py (:func:`check_member`),
source.py (reading bundle files without following links), writer.py (creating the members).
"""

from installer.unpack.archive import ExtractResult, extract_archive
from installer.unpack.copy import CopyCancelled, copy_verified
from installer.unpack.members import check_member
from installer.unpack.source import compression_of, open_regular
from installer.unpack.writer import DEFAULT_WORKERS

__all__ = ["DEFAULT_WORKERS", "CopyCancelled", "ExtractResult", "check_member", "compression_of", "copy_verified",
           "extract_archive", "open_regular"]
