import pytest
import torch
from torch import nn

from deepshrink.compress.share import HashShare, position_hash
from deepshrink.compress.share.hashing import hash_tie
from deepshrink.core.errors import InputError
from deepshrink.core.methods import apply_method

pytestmark = pytest.mark.unit


def test_position_hash_is_seeded_balanced_and_in_range():
    index, sign = position_hash(20_000, 50, seed=3)
    again, _ = position_hash(20_000, 50, seed=3)
    other, _ = position_hash(20_000, 50, seed=4)
    assert torch.equal(index, again) and not torch.equal(index, other)
    assert index.min() >= 0 and index.max() < 50
    counts = torch.bincount(index, minlength=50).float()
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()  # ~400 per bucket
    assert set(sign.unique().tolist()) == {-1.0, 1.0} and abs(float(sign.mean())) < 0.05


def test_hashed_layer_uses_only_its_buckets_and_trains_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    counts = hash_tie(model, HashShare(bucket_fraction=0.1))
    assert counts == {"0": 120, "2": 15}
    layer = model[0]
    buckets = layer.parametrizations.weight.original
    assert buckets.shape == (120,)
    assert layer.weight.abs().unique().numel() <= 120
    layer.weight.sum().backward()
    index, sign = position_hash(1200, 120, seed=0)
    # d(sum of weights)/d(bucket) = sum of the signs of the weights hashed into it
    assert torch.allclose(buckets.grad, torch.zeros(120).index_add_(0, index, sign))


def test_hash_share_returns_a_plain_model_with_tied_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    shared = apply_method(model, HashShare(bucket_fraction=0.25))
    assert {n for n, _ in shared.named_parameters()} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert shared[0].weight.abs().unique().numel() <= 512
    assert not torch.equal(shared[0].weight, model[0].weight)  # the caller's model is untouched
    with pytest.raises(InputError, match="bucket_fraction"):
        HashShare(bucket_fraction=0.0)
