"""Up-front checks on what a user hands the transformer path, each failing in one line before anything is written.

A model directory must hold weights (a bare config is a random model, asked for
by giving the ``config.json`` itself); the architecture must be a BERT-like
encoder (what pruning, export and the fused ONNX Runtime kernels assume); the
tokenizer must belong to the model (its ids fit the vocabulary); and no
text may need more tokens than the model has positions.
"""

from pathlib import Path

from torch import nn

from deepshrink.core.errors import InputError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)  # read in this order
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "mpnet")


def check_model_dir(path: Path) -> None:
    """A directory must have a config and weights; a ``config.json`` file alone means random weights on purpose."""
    if not path.is_dir():
        return
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json in the model directory")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise InputError(f"{path}: no weights ({' or '.join(WEIGHT_FILES[::2])}); for random weights give the config.json itself")


def check_architecture(model: nn.Module) -> None:
    """BERT-like encoders only: one line naming the model type otherwise."""
    from deepshrink.transformers.prune import attention_blocks, ffn_blocks

    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type not in ENCODER_TYPES or not attention_blocks(model) or not ffn_blocks(model):
        raise InputError(
            f"model type {model_type!r} is not supported: deepshrink compresses BERT-like encoders ({', '.join(ENCODER_TYPES)})"
        )


def check_tokenizer(tokenizer, config) -> None:
    """The tokenizer's ids must fit the model's vocabulary."""
    size, vocab = len(tokenizer), int(config.vocab_size)
    if size > vocab:
        raise InputError(f"the tokenizer has {size} tokens but the model's vocabulary has {vocab}: they do not belong together")


def max_tokens(max_length: int, config) -> int:
    """``max_length`` capped at the model's position table (texts that need more are refused by ``check_text_lengths``)."""
    positions = getattr(config, "max_position_embeddings", None)
    return max_length if positions is None else min(max_length, int(positions))


def check_text_lengths(texts: list[str], tokenizer, config) -> None:
    """No text may need more tokens (specials included) than the model has positions: it would be cut silently."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return
    for i, text in enumerate(texts):
        tokens = len(tokenizer(text, truncation=False)["input_ids"])
        if tokens > int(positions):
            raise InputError(f"text {i + 1} is {tokens} tokens, longer than the model's {int(positions)} positions")
