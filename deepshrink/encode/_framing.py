"""Byte-level helpers shared by the stream formats: a fixed header and a zlib-packed table, both length-checked."""

import struct
import zlib

from deepshrink.encode.container import DszError


def read_header(data: bytes, header: struct.Struct, magic: bytes, what: str) -> tuple:
    """Unpack ``header`` from the start of ``data`` after checking its length and magic."""
    if len(data) < header.size:
        raise DszError(f"truncated {what} ({len(data)} bytes, the header alone needs {header.size})")
    fields = header.unpack_from(data)
    if fields[0] != magic:
        raise DszError(f"not a {what} (magic {fields[0]!r}, expected {magic!r})")
    return fields[1:]


def pack_table(raw: bytes) -> bytes:
    """Compress a side table (code lengths, counts): mostly zeros and small numbers, so zlib shrinks it a lot."""
    return zlib.compress(raw, 9)


def unpack_table(packed: bytes, size: int, what: str) -> bytes:
    """Inflate a table that must come out exactly ``size`` bytes; never inflates more than that (no zip bombs)."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(packed, size + 1)
    except zlib.error as exc:
        raise DszError(f"corrupt {what} ({exc})") from None
    if len(raw) != size or not inflater.eof or inflater.unused_data:
        raise DszError(f"corrupt {what} (expected {size} bytes of table)")
    return raw
