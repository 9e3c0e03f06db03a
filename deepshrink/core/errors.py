"""Error types. The CLI prints ``str(error)`` as one line, so messages name the
problem (file, field, value) and, where it helps, how to fix it."""


class DeepShrinkError(Exception):
    """Base class for every error deepshrink raises on purpose."""


class InputError(DeepShrinkError, ValueError):
    """The user's input (file, argument, config value) is missing or malformed."""


class NotApplicable(InputError):
    """The method has nothing to act on in this model (Tucker-2 on a network whose
    3x3 convolutions are all depthwise, say): not a failure of the method or the input."""


class DatasetError(InputError):
    """A dataset is missing or corrupt."""


class WeightsError(InputError):
    """A weights file is missing, corrupt or does not match its model."""
