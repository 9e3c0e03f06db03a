"""Writing files so that no reader ever sees half of one."""

import os
import secrets
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write through a uniquely named temporary file in the same folder, then
    rename: an interrupt or error never leaves half a file (nor the temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
