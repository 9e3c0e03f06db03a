"""Weights on disk: safetensors only (never pickle), written atomically, with
the pretrained zoo's manifest (sha256, accuracy, how they were trained)."""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from deepshrink.core.errors import WeightsError
from deepshrink.core.files import write_atomic, write_safetensors
from deepshrink.core.modules import replace_module

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
MANIFEST = PRETRAINED_DIR / "manifest.json"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict as safetensors, atomically and durably; the same weights give the same bytes."""
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return write_safetensors(path, tensors, metadata)


def load_weights(model: nn.Module, path: str | Path, expected_sha256: str | None = None, resize: bool = False) -> nn.Module:
    """Load safetensors weights into ``model``; names must match exactly, and shapes too
    unless ``resize`` lets channel-pruned weights rebuild the layers they belong to."""
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
    if resize:
        resize_to_state_dict(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise WeightsError(f"{path}: weights do not match the model ({' '.join(first[1:3]).strip() or first[0]})") from None
    return model


def _resized(module: nn.Module, weight: torch.Tensor) -> nn.Module | None:
    """A fresh layer like ``module`` but with the channel counts of ``weight`` (None if unchanged)."""
    if weight.shape == module.weight.shape:
        return None
    if isinstance(module, nn.Conv2d):
        out_channels, in_per_group = weight.shape[:2]
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        groups = out_channels if depthwise else module.groups
        return nn.Conv2d(
            in_per_group * groups,
            out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            groups,
            module.bias is not None,
            module.padding_mode,
        )
    if isinstance(module, nn.Linear):
        return nn.Linear(weight.shape[1], weight.shape[0], module.bias is not None)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return type(module)(weight.shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
    return None


def resize_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild conv/linear/BN layers whose weights in ``state`` have other channel counts.

    Structured pruning removes channels, so a pruned checkpoint or archive no
    longer fits the zoo architecture it came from; the shapes in the state dict
    say exactly which layers shrank.
    """
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if weight is None or not isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        replacement = _resized(module, weight)
        if replacement is not None:
            model = replace_module(model, name, replacement.train(module.training))
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
    write_atomic(MANIFEST, (json.dumps(dict(sorted(manifest.items())), indent=2) + "\n").encode())
    return manifest[name]
