"""deepshrink: make trained neural networks smaller and faster, and measure it."""

__version__ = "0.1.0"
