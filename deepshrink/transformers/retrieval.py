"""A task-level measure for sentence encoders: do the nearest neighbours stay the same?

Cosine to the fp32 model says how far each vector moved; a retrieval user sees
whether the ranking changed. ``neighbour_agreement`` embeds a corpus with both
models and, for each query sentence, compares its top-k neighbours (cosine,
itself excluded) under the compressed model with those under the original.

The corpus ships with Python itself: the prose of the language reference that
``help()`` shows (``pydoc_data.topics``), split into sentences. Nothing is
downloaded, and the same interpreter version gives the same sentences.
"""

import re
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from deepshrink.core.errors import InputError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def python_docs_sentences(min_words: int = 6, max_words: int = 48) -> list[str]:
    """Unique prose sentences of the Python language reference shipped with the interpreter, in topic order.

    Indented paragraphs (code, grammar) and doctest lines are left out.
    """
    from pydoc_data.topics import topics

    found: dict[str, None] = {}
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            if paragraph.startswith(" "):
                continue
            for sentence in _SENTENCE_END.split(re.sub(r"\s+", " ", paragraph).strip()):
                words = len(sentence.split())
                if min_words <= words <= max_words and sentence[0].isupper() and sentence[-1] in ".!?" and ">>>" not in sentence:
                    found.setdefault(sentence)
    return list(found)


@dataclass(frozen=True)
class Agreement:
    """Mean and worst share of each query's top-k neighbours that the compressed model keeps."""

    mean: float
    min: float
    queries: int
    corpus: int
    k: int

    def to_dict(self) -> dict:
        return asdict(self)


def top_k_neighbours(embeddings: Tensor, queries: int, k: int) -> Tensor:
    """Indices ``[queries, k]`` of the k nearest corpus rows (cosine) to each of the first ``queries`` rows, itself excluded."""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    sims = unit[:queries] @ unit.T
    sims[torch.arange(queries), torch.arange(queries)] = float("-inf")
    return sims.topk(k, dim=1).indices


def neighbour_agreement(reference: Tensor, candidate: Tensor, queries: int = 200, k: int = 10) -> Agreement:
    """Top-k overlap per query between two embeddings of the same corpus (rows in the same order)."""
    if reference.shape != candidate.shape or reference.dim() != 2:
        raise InputError(f"neighbour_agreement: need two equal 2-d shapes, got {tuple(reference.shape)} and {tuple(candidate.shape)}")
    if not 1 <= k < reference.shape[0] or not 1 <= queries <= reference.shape[0]:
        raise InputError(
            f"neighbour_agreement: need 1 <= k < corpus size and 1 <= queries <= corpus size; got k={k}, queries={queries}, corpus {reference.shape[0]}"
        )
    ref, cand = top_k_neighbours(reference, queries, k), top_k_neighbours(candidate, queries, k)
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ref, cand, strict=True)])
    return Agreement(float(overlap.mean()), float(overlap.min()), queries, int(reference.shape[0]), k)
