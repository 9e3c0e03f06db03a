"""Shared mechanism used by every layer of the package: errors and registries."""

from deepshrink.core.errors import DeepShrinkError, InputError
from deepshrink.core.registry import Registry

__all__ = ["DeepShrinkError", "InputError", "Registry"]
