"""BERT-like encoders from a local directory or a config, and token batches for them.

Nothing is downloaded: a directory is read with ``local_files_only=True``, and a
config (a ``config.json``, a dict or a ``PretrainedConfig``) builds a model with
seeded random weights. ``transformers`` is imported here, lazily, so that
deepshrink imports without the optional extra.
"""

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshrink.core.errors import InputError
from deepshrink.transformers.checks import WEIGHT_FILES, check_architecture, check_model_dir

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask[, token_type_ids]
PAD_TOKENS = ("[PAD]", "<pad>", "<PAD>")


def require_transformers():
    """The ``transformers`` module, or a one-line error naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise InputError("this needs Hugging Face transformers: pip install 'deepshrink[transformers]'") from None
    return transformers


def load_encoder(source: Any, num_labels: int | None = None, seed: int = 0) -> nn.Module:
    """An encoder in eval mode: ``AutoModel`` (or ``AutoModelForSequenceClassification`` when
    ``num_labels`` is set) from a model directory, a ``config.json``, a dict or a config object.

    A config (a ``config.json`` given as such, a dict, an object) gets random
    weights drawn with ``seed``; a directory loads its weights (safetensors
    preferred) and must have some. Only BERT-like encoders are accepted.
    """
    tf = require_transformers()
    auto = tf.AutoModel if num_labels is None else tf.AutoModelForSequenceClassification
    extra = {} if num_labels is None else {"num_labels": num_labels}
    path = Path(source) if isinstance(source, (str, Path)) else None
    if path is not None:
        check_model_dir(path)
    if path is not None and path.is_dir() and any((path / f).is_file() for f in WEIGHT_FILES):
        try:
            model = auto.from_pretrained(str(path), local_files_only=True, **extra)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot load the model ({str(exc).splitlines()[0]})") from None
        check_architecture(model)
        return model.eval()
    config = load_config(source)
    for key, value in extra.items():
        setattr(config, key, value)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = auto.from_config(config)
    check_architecture(model)
    return model.eval()


def load_config(source: Any):
    """A ``PretrainedConfig`` from a config object, a dict, a ``config.json`` or a directory holding one."""
    tf = require_transformers()
    if isinstance(source, tf.PretrainedConfig):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise InputError(f"{source}: no such model directory or config.json")
        try:
            source = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(source, dict):
        raise InputError(f"expected a model directory, config.json, dict or PretrainedConfig, got {type(source).__name__}")
    values = dict(source)
    model_type = values.pop("model_type", "bert")
    try:
        return tf.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as exc:
        raise InputError(f"config: {str(exc).splitlines()[0]}") from None


def bert_config(
    vocab_size: int = 1000,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    **kwargs: Any,
):
    """A ``BertConfig`` for a random-weight encoder of the given size (tests, benchmarks)."""
    tf = require_transformers()
    return tf.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_positions,
        **kwargs,
    )


def load_tokenizer(path: str | Path):
    """A fast tokenizer from a model directory or a ``tokenizer.json`` file, read locally."""
    tf = require_transformers()
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such tokenizer directory or tokenizer.json")
    try:
        if path.is_file():
            tokenizer = tf.PreTrainedTokenizerFast(tokenizer_file=str(path))
        else:
            tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token is None:  # a bare tokenizer.json names no special tokens; batches need padding
        vocab = tokenizer.get_vocab()
        pad = next((t for t in PAD_TOKENS if t in vocab), None)
        if pad is None:
            raise InputError(f"{path}: the tokenizer has no padding token (looked for {', '.join(PAD_TOKENS)})")
        tokenizer.pad_token = pad
    return tokenizer


def tokenize(texts: Sequence[str], tokenizer, batch_size: int = 16, max_length: int = 128) -> list[Batch]:
    """Texts as padded token batches (each batch padded to its longest text)."""
    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InputError("texts: need at least one non-empty string, and no empty ones")
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})
    return batches


def read_texts(path: str | Path) -> list[str]:
    """One text per non-empty line of a UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such texts file")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise InputError(f"{path}: no texts (one per line expected)")
    return texts


def random_token_batches(
    vocab_size: int, samples: int = 32, min_len: int = 8, max_len: int = 32, batch_size: int = 8, seed: int = 0, special: int = 4
) -> list[Batch]:
    """Seeded token sequences of varied lengths, padded with 0: input when a model has no tokenizer.

    Ids below ``special`` (padding and other special tokens) are not drawn.
    """
    if not 1 <= min_len <= max_len or samples < 1 or batch_size < 1 or vocab_size <= special:
        raise InputError(
            f"random tokens: need 1 <= min_len <= max_len, samples, batch_size >= 1; got {min_len}, {max_len}, {samples}, {batch_size}"
        )
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (samples,), generator=g).tolist()
    sequences = [torch.randint(special, vocab_size, (n,), generator=g) for n in lengths]
    return batch_sequences(sequences, batch_size)


def batch_sequences(sequences: Iterable[torch.Tensor | Sequence[int]], batch_size: int = 8) -> list[Batch]:
    """Token id sequences as right-padded batches with attention masks."""
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    if not seqs or any(s.dim() != 1 or s.numel() == 0 for s in seqs):
        raise InputError("token sequences: need at least one, each a non-empty 1-d list of ids")
    batches = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def check_batches(batches: Sequence[Batch], vocab_size: int | None = None) -> list[Batch]:
    """Fail at once, in one line, on malformed token batches."""
    batches = list(batches)
    if not batches:
        raise InputError("token batches: none given")
    for i, batch in enumerate(batches):
        if not isinstance(batch, dict) or "input_ids" not in batch or "attention_mask" not in batch:
            raise InputError(f"token batch {i}: expected a dict with input_ids and attention_mask")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise InputError(
                f"token batch {i}: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be equal 2-d shapes"
            )
        if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
            raise InputError(f"token batch {i}: ids must be in [0, {vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        if (mask.sum(dim=1) == 0).any():
            raise InputError(f"token batch {i}: a sequence has an all-zero attention mask")
    return batches
