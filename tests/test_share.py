"""k-means weight sharing: 1-D k-means, tied codebook weights and their gradient, KMeansShare."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.compress.prune import apply_masks, magnitude_masks
from deepshrink.compress.share import KMeansShare, codebook_of, kmeans_1d, tie, tie_to_codebooks, untie
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import DataBundle
from deepshrink.models import create_model
from deepshrink.train import TrainConfig

pytestmark = pytest.mark.unit

INITS = ["linear", "density", "random"]


def clusters(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """600 values in three tight, well-separated clusters around -1, 0.2 and 3."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([-1.0, 0.2, 3.0])
    label = torch.arange(600) % 3
    values = centres[label] + 1e-3 * torch.randn(600, generator=g)
    return values, label


def assert_nearest(values: torch.Tensor, centroids: torch.Tensor, assignment: torch.Tensor) -> None:
    distances = (values[:, None].double() - centroids[None, :].double()).abs()
    chosen = distances.gather(1, assignment[:, None]).squeeze(1)
    assert (chosen <= distances.min(1).values + 1e-6).all()


# -- kmeans_1d ----------------------------------------------------------------------------
@pytest.mark.parametrize("init", INITS)
def test_few_distinct_values_are_the_codebook(init):
    values = torch.tensor([0.5, -2.0, 0.5, 7.25, -2.0, 0.5, 1e-8])
    centroids, assignment = kmeans_1d(values, 4, init=init)
    assert torch.equal(centroids, torch.tensor([-2.0, 1e-8, 0.5, 7.25]))
    assert torch.equal(centroids[assignment], values)
    centroids, assignment = kmeans_1d(values, 16, init=init)  # k larger than the distinct count
    assert centroids.numel() == 4 and torch.equal(centroids[assignment], values)


def test_single_value_and_empty():
    centroids, assignment = kmeans_1d(torch.full((10,), 3.5), 4)
    assert torch.equal(centroids, torch.tensor([3.5])) and torch.equal(assignment, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError):
        kmeans_1d(torch.tensor([]), 4)


@pytest.mark.parametrize("init", ["linear", "density"])
def test_finds_well_separated_clusters(init):
    values, label = clusters()
    centroids, assignment = kmeans_1d(values, 3, init=init)
    assert centroids.dtype == torch.float32
    assert torch.allclose(centroids, torch.tensor([-1.0, 0.2, 3.0]), atol=2e-3)
    assert torch.equal(assignment, label)  # centroids sorted, so cluster i is centre i
    for i in range(3):
        assert centroids[i] == pytest.approx(values[label == i].double().mean().item(), abs=1e-6)  # centroid = member mean


@pytest.mark.parametrize("init", INITS)
def test_assignment_is_nearest_centroid(init):
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2000, generator=g) * torch.rand(2000, generator=g)  # peaky, like trained weights
    centroids, assignment = kmeans_1d(values, 16, init=init, iters=1000)  # enough iterations to converge
    assert 1 <= centroids.numel() <= 16
    assert (centroids[1:] > centroids[:-1]).all()  # sorted, distinct
    assert assignment.dtype == torch.long and assignment.shape == values.shape
    assert_nearest(values, centroids, assignment)
    # Every cluster k-means keeps is used, and its centroid is the mean of its members.
    counts = torch.bincount(assignment, minlength=centroids.numel())
    for i in torch.nonzero(counts).flatten().tolist():
        assert centroids[i].item() == pytest.approx(values[assignment == i].double().mean().item(), abs=1e-4)


@pytest.mark.parametrize("init", INITS)
def test_deterministic_for_a_seed(init):
    values = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    a = kmeans_1d(values, 8, init=init, seed=5)
    b = kmeans_1d(values, 8, init=init, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_random_init_depends_on_seed():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    results = {tuple(kmeans_1d(values, 8, init="random", seed=s, iters=1)[0].tolist()) for s in range(4)}
    assert len(results) > 1


def test_unknown_init():
    with pytest.raises(ValueError, match="init"):
        kmeans_1d(torch.randn(100), 4, init="kmeans++")  # type: ignore[arg-type]


def test_clustering_reduces_error_over_linear_grid():
    values = torch.randn(3000, generator=torch.Generator().manual_seed(4))
    centroids, assignment = kmeans_1d(values, 8)
    grid = torch.linspace(float(values.min()), float(values.max()), 8)
    grid_error = ((values[:, None] - grid[None]).abs().min(1).values ** 2).sum()
    assert ((values - centroids[assignment]) ** 2).sum() < grid_error


# -- tie / untie ----------------------------------------------------------------------------------
def tied_linear(seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.Linear(6, 5)
    codebook = torch.tensor([-0.7, -0.1, 0.3, 0.9])
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 4, (30,), generator=g)
    keep = torch.rand(30, generator=g) > 0.3
    tie(layer, codebook, indices, keep)
    return layer, codebook, indices, keep


def test_tie_weight_is_codebook_lookup_with_positive_zeros():
    layer, codebook, indices, keep = tied_linear()
    expected = torch.where(keep, codebook[indices], torch.zeros(())).view(5, 6)
    w = layer.weight.detach()
    assert torch.equal(w, expected)
    assert (w.flatten()[~keep] == 0).all()
    assert not torch.signbit(w.flatten()[~keep]).any()
    assert torch.equal(codebook_of(layer).detach(), codebook)
    assert isinstance(codebook_of(layer), nn.Parameter)
    assert parametrize.is_parametrized(layer, "weight")


def test_codebook_gradient_is_sum_of_member_weight_gradients():
    layer, codebook, indices, keep = tied_linear(seed=1)
    reference = nn.Linear(6, 5)
    with torch.no_grad():
        reference.weight.copy_(layer.weight)
        reference.bias.copy_(layer.bias)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(9))
    target = torch.randn(7, 5, generator=torch.Generator().manual_seed(10))
    for net in (layer, reference):
        ((net(x) - target) ** 2).sum().backward()
    weight_grad = reference.weight.grad.flatten()
    expected = torch.zeros(4).index_add_(0, indices[keep], weight_grad[keep])
    got = codebook_of(layer).grad
    assert got is not None and got.shape == (4,)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.abs().sum() > 0
    # Pruned positions contribute nothing: their weight gradient is not all zero, yet is left out.
    assert weight_grad[~keep].abs().sum() > 0
    assert not torch.allclose(torch.zeros(4).index_add_(0, indices, weight_grad), expected)


def test_optimizer_step_on_codebook_keeps_weights_tied():
    layer, _, indices, keep = tied_linear(seed=2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(4, 6)).pow(2).sum().backward()
        optimizer.step()
    cb = codebook_of(layer).detach()
    assert torch.equal(layer.weight.detach(), torch.where(keep, cb[indices], torch.zeros(())).view(5, 6))
    assert not torch.allclose(cb, torch.tensor([-0.7, -0.1, 0.3, 0.9]))


def test_untie_bakes_values_and_removes_parametrization():
    layer, *_ = tied_linear()
    model = nn.Sequential(layer, nn.ReLU())
    values = layer.weight.detach().clone()
    assert untie(model) is model
    assert not parametrize.is_parametrized(layer)
    assert not hasattr(layer, "parametrizations")
    assert isinstance(layer.weight, nn.Parameter) and layer.weight.shape == (5, 6)
    assert torch.equal(layer.weight.detach(), values)
    assert list(model.state_dict()) == ["0.weight", "0.bias"]  # the layer's own order, as before tie


# -- KMeansShare ----------------------------------------------------------------------------------
def distinct_nonzero(module: nn.Module) -> int:
    w = module.weight.detach()
    return int(w[w != 0].unique().numel())


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def pruned_lenet5(sparsity: float = 0.5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("lenet5", num_classes=4)
    apply_masks(model, magnitude_masks(model, sparsity))
    return model


def test_share_small_mlp_respects_bits_and_zeros():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    apply_masks(mlp, magnitude_masks(mlp, 0.4))
    zeros = {n: m.weight.detach() == 0 for n, m in weight_layers(mlp).items()}
    shared = apply_method(mlp, KMeansShare(linear_bits=3))
    for name, m in weight_layers(shared).items():
        assert 4 < distinct_nonzero(m) <= 8, name  # hundreds of distinct weights -> at most 2^3 shared values
        assert torch.equal(m.weight.detach() == 0, zeros[name]), name
        assert not parametrize.is_parametrized(m)
    assert list(shared.state_dict()) == list(mlp.state_dict())
    assert torch.equal(shared[0].bias, mlp[0].bias)  # biases are not shared


def test_conv_and_linear_bits_apart():
    model = pruned_lenet5()
    shared = apply_method(model, KMeansShare(conv_bits=3, linear_bits=2))
    for name, m in weight_layers(shared).items():
        original = weight_layers(model)[name].weight.detach()
        w = m.weight.detach()
        assert torch.equal(w == 0, original == 0), name
        assert not torch.signbit(w[w == 0]).any()
        if isinstance(m, nn.Conv2d):
            assert 4 < distinct_nonzero(m) <= 8, name
        else:
            assert distinct_nonzero(m) <= 4, name
        # Shared values approximate the originals: each weight went to a nearby centroid.
        assert (w - original).abs().max() < original.abs().max()


def test_scope_limits_sharing():
    model = pruned_lenet5()
    shared = apply_method(model, KMeansShare(linear_bits=2, scope=Scope(types=("Linear",))))
    for name, m in weight_layers(shared).items():
        if isinstance(m, nn.Conv2d):
            assert torch.equal(m.weight, weight_layers(model)[name].weight), name
        else:
            assert distinct_nonzero(m) <= 4


def test_tie_to_codebooks_sizes_and_all_zero_layer_skipped():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 3))
    with torch.no_grad():
        mlp[1].weight.zero_()
    sizes = tie_to_codebooks(mlp, KMeansShare(linear_bits=2))
    assert sizes == {"0": 4}
    assert parametrize.is_parametrized(mlp[0]) and not parametrize.is_parametrized(mlp[1])
    untie(mlp)
    assert (mlp[1].weight == 0).all()


def test_already_shared_weights_are_kept_exactly():
    model = apply_method(pruned_lenet5(), KMeansShare(conv_bits=3, linear_bits=3))
    again = apply_method(model, KMeansShare(conv_bits=3, linear_bits=3))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_share_non_finite_weights():
    model = pruned_lenet5()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        apply_method(model, KMeansShare())


def test_share_with_finetune_keeps_weights_tied_and_zeros(learnable_set):
    model = pruned_lenet5(sparsity=0.6)
    data = DataBundle("synthetic", learnable_set, learnable_set.subset(64), learnable_set.subset(64), 4, (0.0,), (1.0,))
    cfg = KMeansShare(conv_bits=3, linear_bits=2)
    untuned = apply_method(model, cfg)
    cfg_ft = KMeansShare(conv_bits=3, linear_bits=2, finetune=TrainConfig(epochs=1, batch_size=64, lr=0.05, weight_decay=1e-3))
    tuned = apply_method(model, cfg_ft, Context(data=data, progress=False))
    changed = False
    for name, m in weight_layers(tuned).items():
        original = weight_layers(model)[name].weight.detach()
        w = m.weight.detach()
        limit = 8 if isinstance(m, nn.Conv2d) else 4
        assert distinct_nonzero(m) <= limit, name
        assert torch.equal(w == 0, original == 0), name
        assert not torch.signbit(w[w == 0]).any()
        assert not parametrize.is_parametrized(m)
        changed |= not torch.equal(w, weight_layers(untuned)[name].weight.detach())
    assert changed  # the codebooks were trained
    assert list(tuned.state_dict()) == list(model.state_dict())


def test_finetune_needs_data():
    with pytest.raises(InputError, match="data"):
        apply_method(pruned_lenet5(), KMeansShare(finetune=TrainConfig(epochs=1)))


@pytest.mark.parametrize("key", ["conv_bits", "linear_bits"])
@pytest.mark.parametrize("bits", [0, 17, -1])
def test_bits_out_of_range(key, bits):
    with pytest.raises(InputError, match=key):
        KMeansShare(**{key: bits})
    with pytest.raises(InputError, match=rf"share\.{key}"):
        KMeansShare.from_dict({key: bits}, "share")


def test_bits_limits_accepted():
    cfg = KMeansShare(conv_bits=1, linear_bits=16)
    assert cfg.bits_for(nn.Conv2d(1, 1, 1)) == 1 and cfg.bits_for(nn.Linear(1, 1)) == 16
    shared = apply_method(pruned_lenet5(), KMeansShare(conv_bits=1, linear_bits=1))
    assert all(distinct_nonzero(m) <= 2 for m in weight_layers(shared).values())


def test_random_init_share_is_deterministic():
    model = pruned_lenet5()
    a = apply_method(model, KMeansShare(conv_bits=3, linear_bits=3, init="random", seed=7))
    b = apply_method(model, KMeansShare(conv_bits=3, linear_bits=3, init="random", seed=7))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
