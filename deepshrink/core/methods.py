"""Method registry keyed by config type: ``apply_method(model, cfg, ctx)`` finds
the function registered for ``type(cfg)`` and runs it on a copy of the model,
so the caller's model is never modified."""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from deepshrink.core.errors import InputError

_METHODS: dict[type, Callable[..., nn.Module]] = {}


@dataclass
class Context:
    """What a method may need besides the model and its config."""

    data: Any = None  # a deepshrink.data.DataBundle, for fine-tuning and calibration
    progress: bool = True
    calib: Any = None  # an iterable of input batches; overrides data.train for calibration
    teacher: Any = None  # the model before compression: distillation steps without a named teacher use it
    model_name: str | None = None  # the zoo name of the input model, when it has one (``student: auto``)


def register(config_type: type) -> Callable:
    def add(func: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if config_type in _METHODS:
            raise ValueError(f"a method is already registered for {config_type.__name__}")
        _METHODS[config_type] = func
        return func

    return add


def apply_method(model: nn.Module, config: Any, ctx: Context | None = None) -> nn.Module:
    try:
        method = _METHODS[type(config)]
    except KeyError:
        raise InputError(f"no method registered for config {type(config).__name__}") from None
    return method(copy.deepcopy(model), config, ctx or Context())
