"""Error types. The CLI prints ``str(error)`` as one line, so messages name the
problem (file, field, value) and, where it helps, how to fix it."""


class DeepShrinkError(Exception):
    """Base class for every error deepshrink raises on purpose."""


class InputError(DeepShrinkError, ValueError):
    """The user's input (file, argument, config value) is missing or malformed."""


class DatasetError(InputError):
    """A dataset is missing or corrupt."""


class WeightsError(InputError):
    """A weights file is missing, corrupt or does not match its model."""
