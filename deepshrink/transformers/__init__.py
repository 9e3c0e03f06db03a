"""Compress Hugging Face BERT-like encoders (the optional extra ``deepshrink[transformers]``).

Models come from a local directory or a config, never from a hub. Methods:
dynamic int8 with a sensitivity-based fp32 fallback, attention-head and
FFN-neuron pruning with physical removal (and optional distillation), SVD of
the projections; ONNX export and ONNX Runtime execution; fidelity (``evaluate.fidelity``)
as the cosine of mean-pooled embeddings, and task accuracy where labels exist.

Importing this package does not import ``transformers``; the functions that
need it do, and say which extra to install when it is missing.
"""

from deepshrink.transformers.distill import TransformerDistill, distill
from deepshrink.transformers.export import encoder_dynamic_onnx, encoder_onnx_bytes, ort_logits, ort_outputs, ort_pooled
from deepshrink.transformers.fallback import FallbackResult, quantize_with_fallback, quantized_layer_fidelity
from deepshrink.transformers.fidelity import logits_of, mean_pool, pooled_embeddings, task_accuracy
from deepshrink.transformers.load import (
    Batch,
    batch_sequences,
    bert_config,
    check_batches,
    load_config,
    load_encoder,
    load_tokenizer,
    random_token_batches,
    read_texts,
    tokenize,
)
from deepshrink.transformers.lowrank import TransformerSVD, decompose_transformer
from deepshrink.transformers.prune import TransformerPrune, attention_blocks, ffn_blocks, ffn_sizes, head_counts, prune_transformer

__all__ = [
    "Batch",
    "TransformerDistill",
    "FallbackResult",
    "TransformerPrune",
    "TransformerSVD",
    "attention_blocks",
    "batch_sequences",
    "bert_config",
    "check_batches",
    "decompose_transformer",
    "distill",
    "encoder_dynamic_onnx",
    "encoder_onnx_bytes",
    "ffn_blocks",
    "ffn_sizes",
    "head_counts",
    "quantized_layer_fidelity",
    "load_config",
    "load_encoder",
    "load_tokenizer",
    "logits_of",
    "mean_pool",
    "ort_logits",
    "ort_outputs",
    "ort_pooled",
    "pooled_embeddings",
    "prune_transformer",
    "quantize_with_fallback",
    "random_token_batches",
    "read_texts",
    "task_accuracy",
    "tokenize",
]
