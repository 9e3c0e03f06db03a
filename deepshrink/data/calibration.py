"""CalibrationSet: turn any iterable of batches into a stream of model inputs.

Calibration (quantization observers, sensitivity analysis) only needs inputs.
Users hold data in many forms, so this accepts tensors, (input, label) tuples
and dicts, applies an optional transform, stops after ``max_samples`` and
streams, so memory stays flat in the number of samples.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from deepshrink.core.errors import InputError


class CalibrationSet:
    def __init__(
        self,
        source: Iterable[Any],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_samples: int | None = None,
        input_key: str | int = 0,
    ) -> None:
        if max_samples is not None and max_samples <= 0:
            raise InputError(f"max_samples must be positive, got {max_samples}")
        self.source = source
        self.transform = transform
        self.max_samples = max_samples
        self.input_key = input_key

    def _extract(self, item: Any) -> torch.Tensor:
        if isinstance(item, dict):
            if self.input_key not in item:
                raise InputError(f"calibration batch is a dict without key {self.input_key!r}; keys: {sorted(item)}")
            item = item[self.input_key]
        elif isinstance(item, (tuple, list)):
            item = item[self.input_key if isinstance(self.input_key, int) else 0]
        if not isinstance(item, torch.Tensor):
            raise InputError(f"calibration batch must hold a tensor, got {type(item).__name__}")
        if self.transform is not None:
            item = self.transform(item)
        if item.ndim == 0 or not item.is_floating_point():
            raise InputError(f"calibration input must be a floating-point batch, got {item.dtype} of shape {tuple(item.shape)}")
        return item

    def __iter__(self) -> Iterator[torch.Tensor]:
        seen = 0
        for item in self.source:
            batch = self._extract(item)
            if self.max_samples is not None:
                batch = batch[: self.max_samples - seen]
            seen += len(batch)
            yield batch
            if self.max_samples is not None and seen >= self.max_samples:
                return
        if seen == 0:
            raise InputError("calibration set is empty")
