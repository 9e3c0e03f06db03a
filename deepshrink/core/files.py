"""Writing files so that no reader ever sees half of one, even after a crash or power loss."""

import json
import os
import secrets
import struct
from pathlib import Path

_TEMP_SUFFIX = ".tmp"


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write through a uniquely named temporary file in the same folder, fsync it, rename it over
    ``path`` and fsync the folder: a reader, a crash or a power loss sees the old file or the new one,
    whole. An error removes the temp file; one left by a killed writer is removed by the next write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # unlike mkstemp's 0600, honours the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)  # ... and the rename itself survives a power loss
    return path


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temp files of ``path`` whose writer process is gone (killed mid-write); returns them."""
    removed = []
    prefix = f".{path.name}."
    for tmp in path.parent.iterdir() if path.parent.is_dir() else ():
        name = tmp.name
        if not (name.startswith(prefix) and name.endswith(_TEMP_SUFFIX)):
            continue
        pid = name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing it now: a temp with our pid is from a dead namesake
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform that cannot open folders (Windows) has no folder fsync either
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the file itself is already synced
    finally:
        os.close(fd)


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its ``__metadata__`` keys sorted.

    The safetensors writer keeps metadata in a Rust HashMap, whose order changes from process to
    process, so the same tensors and metadata gave different bytes on every run."""
    (length,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8 : 8 + length])
    metadata = header.get("__metadata__")
    if not metadata or len(metadata) < 2:
        return blob
    header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format's own padding: tensor data stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + blob[8 + length :]


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Tensors (name -> contiguous torch tensor) as a safetensors file, written atomically; the same
    tensors and metadata always give the same bytes."""
    from safetensors.torch import save

    return write_atomic(path, canonical_safetensors(save(tensors, metadata=metadata)))
