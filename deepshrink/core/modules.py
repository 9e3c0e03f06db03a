"""Layer surgery shared by every method that swaps a layer for another (folding, pruning,
quantization, decomposition, resizing, transformer pruning)."""

from torch import nn


def replace_module(root: nn.Module, dotted_name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``dotted_name`` of ``root`` was, and return the model:
    ``root`` itself, or ``new`` when the name is empty (the root is the layer)."""
    if not dotted_name:
        return new
    parent, _, child = dotted_name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
    return root


def check_layer_names(model: nn.Module, names, field: str) -> None:
    """One line naming the first of ``names`` (a config's ``field``) that is no layer of ``model``."""
    unknown = sorted(set(names) - {name for name, _ in model.named_modules()})
    if unknown:
        from deepshrink.core.errors import InputError

        raise InputError(f"{field}: no layer named {unknown[0]!r} in the model")
