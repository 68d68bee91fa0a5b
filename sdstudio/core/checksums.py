"""sha256 of files, read in chunks so multi-GB models never sit in memory: checkpoint manifests, the FID
weights check, and the "model hash" of a safetensors file that UIs show."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

CHUNK = 16 << 20


def sha256_file(path: str | Path, *, start: int = 0) -> str:
    """Hex sha256 of the file's bytes from offset ``start`` to the end."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def safetensors_data_sha256(path: str | Path) -> str:
    """sha256 of a safetensors file's tensor bytes (without the header): what UIs show as the model hash."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
    return sha256_file(path, start=8 + header_len)
