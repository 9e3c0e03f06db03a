"""The ``.dsz`` archive: a JSON manifest plus named binary streams, checksummed.

Layout (integers little-endian)::

    b"DSZ\\x00" | version u16 | manifest length u32 | manifest (UTF-8 JSON) | stream bytes ... | sha256 of all before (32 bytes)

The manifest is the caller's dict plus a ``streams`` list of ``{name, offset, length, sha256}``; offsets count from the
first stream byte. Every stream has its own sha256 so a corrupt file names the damaged stream. Nothing is ever
unpickled or evaluated: the manifest is parsed with ``json.loads`` only.
"""

import hashlib
import json
import struct
from pathlib import Path

from deepshrink.core.errors import DeepShrinkError
from deepshrink.core.files import write_atomic

MAGIC = b"DSZ\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHI")  # magic, version, manifest length
_DIGEST = 32
STREAMS_KEY = "streams"


class DszError(DeepShrinkError, ValueError):
    """A .dsz archive or one of its encoded streams is missing, truncated or corrupt."""


def _compact_json_bytes(value) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


# A stream-table row's offset and length digits (and its comma) vary with where the stream lands; a typical
# row's share keeps a per-tensor size independent of the other tensors.
_ROW_BYTES = _compact_json_bytes({"name": "", "offset": 0, "length": 0, "sha256": "0" * 64}) + 10


def manifest_share(entry: dict) -> int:
    """Bytes one tensor's ``entry`` adds to the serialised manifest: the entry (and its comma) plus a
    stream-table row for each stream it names in ``entry["streams"]``."""
    return _compact_json_bytes(entry) + 1 + sum(_ROW_BYTES + len(key) for key in entry.get(STREAMS_KEY, {}).values())


def pack_archive(manifest: dict, streams: dict[str, bytes]) -> bytes:
    """Serialise ``manifest`` and ``streams`` (in dict order); the manifest must be plain JSON and not use ``streams``."""
    if not isinstance(manifest, dict):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    if STREAMS_KEY in manifest:
        raise ValueError(f"manifest key {STREAMS_KEY!r} is reserved for the archive's stream table")
    table, offset = [], 0
    for name, blob in streams.items():
        if not isinstance(name, str) or not isinstance(blob, bytes | bytearray | memoryview):
            raise TypeError(f"streams must map str names to bytes, got {type(name).__name__} -> {type(blob).__name__}")
        blob = bytes(blob)
        table.append({"name": name, "offset": offset, "length": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
        offset += len(blob)
    try:
        meta = json.dumps({**manifest, STREAMS_KEY: table}, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError (lone surrogates) is a ValueError
        raise ValueError(f"manifest is not plain JSON ({exc})") from None
    body = b"".join([_HEADER.pack(MAGIC, FORMAT_VERSION, len(meta)), meta, *(bytes(b) for b in streams.values())])
    return body + hashlib.sha256(body).digest()


def _parse_manifest(raw: bytes) -> dict:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DszError(f"corrupt .dsz archive: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get(STREAMS_KEY), list):
        raise DszError(f"corrupt .dsz archive: manifest must be a JSON object with a {STREAMS_KEY!r} list")
    return manifest


def _check_entry(entry: object, expected_offset: int, section: int) -> tuple[str, int, int, str]:
    """Validate one stream table entry: streams must tile the stream section in order, with no gaps."""
    ok = isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("sha256"), str)
    ints = ok and all(type(entry.get(k)) is int for k in ("offset", "length"))
    if not ints:
        raise DszError(f"corrupt .dsz archive: malformed stream table entry {str(entry)[:80]}")
    name, offset, length = entry["name"], entry["offset"], entry["length"]
    if offset != expected_offset or length < 0 or offset + length > section:
        raise DszError(f"corrupt or truncated .dsz archive: stream {name!r} (bytes {offset}..{offset + length}) out of range 0..{section}")
    return name, offset, length, entry["sha256"]


def unpack_archive(data: bytes) -> tuple[dict, dict[str, bytes]]:
    """Parse and verify an archive; return the caller's manifest (without ``streams``) and the streams by name."""
    data = bytes(data)
    if len(data) < _HEADER.size + _DIGEST:
        raise DszError(f"truncated .dsz archive ({len(data)} bytes, the smallest valid one has {_HEADER.size + _DIGEST})")
    magic, version, meta_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DszError(f"not a .dsz archive (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise DszError(f"unsupported .dsz format version {version} (this deepshrink reads version {FORMAT_VERSION})")
    start = _HEADER.size + meta_len
    if start + _DIGEST > len(data):
        raise DszError(f"truncated .dsz archive (manifest declares {meta_len} bytes, file has {len(data)} in all)")
    manifest = _parse_manifest(data[_HEADER.size : start])
    section = len(data) - _DIGEST - start
    streams: dict[str, bytes] = {}
    offset = 0
    for entry in manifest.pop(STREAMS_KEY):
        name, offset, length, digest = _check_entry(entry, offset, section)
        if name in streams:
            raise DszError(f"corrupt .dsz archive: stream {name!r} listed twice")
        blob = data[start + offset : start + offset + length]
        if hashlib.sha256(blob).hexdigest() != digest:
            raise DszError(f"corrupt .dsz archive: checksum mismatch in stream {name!r}")
        streams[name] = blob
        offset += length
    if offset != section:
        raise DszError(f"corrupt .dsz archive: stream section has {section} bytes, the manifest accounts for {offset}")
    if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise DszError("corrupt .dsz archive: file checksum mismatch (header, manifest or trailer damaged)")
    return manifest, streams


def write_archive(path: str | Path, manifest: dict, streams: dict[str, bytes]) -> Path:
    """Write atomically and durably (``write_atomic``) so a crash never leaves half an archive."""
    return write_atomic(path, pack_archive(manifest, streams))


def read_archive(path: str | Path) -> tuple[dict, dict[str, bytes]]:
    """Read and verify an archive file; errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DszError(f"{path}: file not found") from None
    except OSError as exc:
        raise DszError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return unpack_archive(data)
    except DszError as exc:
        raise DszError(f"{path}: {exc}") from None
