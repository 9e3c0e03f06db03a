"""Weights on disk: safetensors only (never pickle), written atomically, with
the pretrained zoo's manifest (sha256, accuracy, how they were trained)."""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deepshrink.core.errors import WeightsError

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
MANIFEST = PRETRAINED_DIR / "manifest.json"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict as safetensors via temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_weights(model: nn.Module, path: str | Path, expected_sha256: str | None = None) -> nn.Module:
    """Load safetensors weights into ``model``; names and shapes must match exactly."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if expected_sha256 is not None and (actual := sha256_of(path)) != expected_sha256:
        raise WeightsError(
            f"{path}: sha256 {actual[:12]}... does not match the manifest's {expected_sha256[:12]}...; the file is corrupt or was replaced"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    for name, tensor in state.items():
        if not tensor.is_floating_point() or torch.isfinite(tensor).all():
            continue
        raise WeightsError(f"{path}: tensor {name!r} holds NaN or infinite values")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise WeightsError(f"{path}: weights do not match the model ({' '.join(first[1:3]).strip() or first[0]})") from None
    return model


def read_manifest() -> dict[str, dict]:
    if not MANIFEST.exists():
        return {}
    return json.loads(MANIFEST.read_text())


def publish_pretrained(name: str, model: nn.Module, entry: dict) -> dict:
    """Store zoo weights in the package and record them in the manifest."""
    path = save_weights(model, PRETRAINED_DIR / f"{name}.safetensors")
    manifest = read_manifest()
    manifest[name] = {"file": path.name, "sha256": sha256_of(path), **entry}
    tmp = MANIFEST.with_name(MANIFEST.name + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    os.replace(tmp, MANIFEST)
    return manifest[name]
