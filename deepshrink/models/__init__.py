"""Model zoo (registered by name), pretrained weights and user models."""

import importlib
from pathlib import Path

import torch
from torch import nn

from deepshrink.core.errors import InputError, WeightsError
from deepshrink.models.weights import PRETRAINED_DIR, load_weights, read_manifest, save_weights
from deepshrink.models.zoo import MODELS, ZOO_INPUT_SIDE


def list_models() -> list[str]:
    return MODELS.names()


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build a zoo model; ``pretrained=True`` loads the Fashion-MNIST weights after checking their sha256."""
    model = MODELS.get(name)(**kwargs)
    if pretrained:
        entry = read_manifest().get(name)
        if entry is None:
            raise WeightsError(f"no pretrained weights for {name!r}; train them with `deepshrink train {name} --publish`")
        if kwargs:
            raise InputError(f"pretrained {name!r} weights are for the default shape; drop {sorted(kwargs)}")
        load_weights(model, PRETRAINED_DIR / entry["file"], expected_sha256=entry["sha256"])
    return model.eval()


def load_user_model(spec: str, weights: str | Path | None = None, **kwargs) -> nn.Module:
    """Build a model from ``package.module:function`` and optionally load safetensors weights."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise InputError(f"user model must be given as module:function, got {spec!r}")
    try:
        builder = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot import user model {spec!r}: {exc}") from None
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def resolve_model(name_or_spec: str, weights: str | Path | None = None, pretrained: bool = True) -> nn.Module:
    """A zoo name (pretrained unless ``weights`` is given) or a user ``module:function``.

    Weights of a zoo model may have fewer channels than the zoo's definition (a
    channel-pruned checkpoint): the layers are rebuilt to the saved shapes, then
    one forward pass on a zoo-sized input checks that the shapes chain."""
    if ":" in name_or_spec:
        return load_user_model(name_or_spec, weights)
    model = create_model(name_or_spec, pretrained=pretrained and weights is None)
    if weights is not None:
        load_weights(model, weights, resize=True)
        _check_runs(model, weights)
    return model


def _check_runs(model: nn.Module, weights: str | Path) -> None:
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    channels = first.in_channels if isinstance(first, nn.Conv2d) else 1
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, ZOO_INPUT_SIDE, ZOO_INPUT_SIDE))
    except RuntimeError as exc:
        raise WeightsError(f"{weights}: the layer shapes in these weights do not chain ({str(exc).splitlines()[0]})") from None


def build_architecture(architecture: dict | None) -> nn.Module:
    """An untrained model from an archive's architecture entry: ``{"zoo": name, "kwargs": {...}}`` or ``{"module": "pkg.mod:fn"}``."""
    if not isinstance(architecture, dict):
        raise InputError("the archive names no architecture; pass the model to load the weights into")
    kwargs = architecture.get("kwargs", {})
    if "zoo" in architecture:
        return create_model(architecture["zoo"], **kwargs)
    if "module" in architecture:
        return load_user_model(architecture["module"], **kwargs)
    raise InputError(f"unknown architecture entry {architecture!r}")


def architecture_of(name_or_spec: str) -> dict:
    return {"module": name_or_spec} if ":" in name_or_spec else {"zoo": name_or_spec}


__all__ = [
    "architecture_of",
    "build_architecture",
    "MODELS",
    "create_model",
    "list_models",
    "load_user_model",
    "load_weights",
    "resolve_model",
    "save_weights",
]
