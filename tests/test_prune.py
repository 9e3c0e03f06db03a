"""Unstructured magnitude pruning: exact masks, +0.0 zeros, masks held through training, AGP schedule."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.compress.prune import (
    GradualPruningHook,
    MagnitudePrune,
    MaskHook,
    agp_fraction,
    apply_masks,
    magnitude_masks,
    sparsity_of,
)
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import DataBundle, ImageSet
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, Trainer

pytestmark = pytest.mark.unit


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),  # "0": 27 weights
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 10),  # "3": 480 weights
        nn.ReLU(),
        nn.Linear(10, 3),  # "5": 30 weights
    )


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def zeros_per_layer(model: nn.Module) -> dict[str, int]:
    return {n: int((m.weight == 0).sum()) for n, m in weight_layers(model).items()}


def bundle(data: ImageSet) -> DataBundle:
    return DataBundle("synthetic", data, data.subset(64), data.subset(64), 4, (0.0,), (1.0,))


def lenet5(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet5", num_classes=4)


# -- magnitude_masks -------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.95])
def test_layerwise_prunes_exact_count_of_smallest(sparsity):
    net = small_net()
    masks = magnitude_masks(net, sparsity)
    layers = weight_layers(net)
    assert set(masks) == set(layers)
    for name, mask in masks.items():
        w = layers[name].weight.detach().abs()
        assert mask.shape == w.shape and mask.dtype == torch.bool
        assert int((~mask).sum()) == int(round(sparsity * w.numel())), name
        if (~mask).any() and mask.any():
            assert w[~mask].max() <= w[mask].min(), name


def test_layerwise_breaks_ties_to_exact_count():
    net = nn.Sequential(nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(0.5)  # all tied
    mask = magnitude_masks(net, 0.37)["0"]
    assert int((~mask).sum()) == 37


def test_global_uses_one_threshold():
    net = small_net()
    with torch.no_grad():  # give the layers very different scales so the global split is uneven
        net[0].weight.mul_(10.0)
        net[5].weight.mul_(0.1)
    masks = magnitude_masks(net, 0.6, granularity="global")
    layers = weight_layers(net)
    kept = torch.cat([layers[n].weight.detach().abs()[m] for n, m in masks.items()])
    pruned = torch.cat([layers[n].weight.detach().abs()[~m] for n, m in masks.items()])
    assert pruned.max() <= kept.min()
    total = sum(m.numel() for m in masks.values())
    assert abs(int((~torch.cat([m.flatten() for m in masks.values()])).sum()) - round(0.6 * total)) <= len(masks)
    assert sparsity_of(masks) == pytest.approx(0.6, abs=len(masks) / total)
    # Not layer-wise: the large-scale conv keeps more, the small-scale head loses more.
    per_layer = {n: float((~m).float().mean()) for n, m in masks.items()}
    assert per_layer["0"] < 0.6 < per_layer["5"]


def test_layer_sparsity_overrides():
    net = small_net()
    masks = magnitude_masks(net, 0.5, layer_sparsity={"0": 0.0, "5": 0.9})
    assert int((~masks["0"]).sum()) == 0
    assert int((~masks["3"]).sum()) == round(0.5 * 480)
    assert int((~masks["5"]).sum()) == round(0.9 * 30)


def test_scope_limits_layers():
    net = small_net()
    masks = magnitude_masks(net, 0.5, scope=Scope(types=("Linear",), exclude="^5$"))
    assert list(masks) == ["3"]


def test_layer_sparsity_names_out_of_scope_layer():
    net = small_net()
    with pytest.raises(InputError, match="fc9"):
        magnitude_masks(net, 0.5, layer_sparsity={"fc9": 0.5})
    with pytest.raises(InputError, match="'0'"):
        magnitude_masks(net, 0.5, scope=Scope(types=("Linear",)), layer_sparsity={"0": 0.5})


def test_no_layers_in_scope():
    with pytest.raises(InputError, match="no layers"):
        magnitude_masks(small_net(), 0.5, scope=Scope(include="nothing-matches"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(bad):
    net = small_net()
    with torch.no_grad():
        net[3].weight[0, 0] = bad
    with pytest.raises(InputError, match="'3'"):
        magnitude_masks(net, 0.5)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 2.0])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(InputError, match="sparsity"):
        magnitude_masks(small_net(), sparsity)


def test_layer_sparsity_out_of_range():
    with pytest.raises(InputError, match="layer_sparsity"):
        magnitude_masks(small_net(), 0.5, layer_sparsity={"3": 1.0})


# -- apply_masks ---------------------------------------------------------------------------
def test_apply_masks_leaves_positive_zero():
    net = small_net()
    with torch.no_grad():
        for m in weight_layers(net).values():
            m.weight.copy_(-m.weight.abs() - 1e-3)  # every weight negative
    masks = magnitude_masks(net, 0.5)
    apply_masks(net, masks)
    for name, m in weight_layers(net).items():
        w = m.weight.detach()
        pruned = w[~masks[name]]
        assert (pruned == 0).all()
        assert not torch.signbit(pruned).any(), name
        assert (w[masks[name]] < 0).all()  # kept weights untouched


def test_apply_masks_keeps_kept_values():
    net = small_net()
    before = {n: m.weight.detach().clone() for n, m in weight_layers(net).items()}
    masks = magnitude_masks(net, 0.4)
    apply_masks(net, masks)
    for name, m in weight_layers(net).items():
        assert torch.equal(m.weight.detach()[masks[name]], before[name][masks[name]])


def test_sparsity_of():
    masks = {"a": torch.tensor([True, False, False, True]), "b": torch.tensor([False, False, True, True])}
    assert sparsity_of(masks) == 0.5
    assert sparsity_of({}) == 0.0


# -- MaskHook through training ---------------------------------------------------------------
TRAIN = TrainConfig(epochs=2, batch_size=64, lr=0.05, momentum=0.9, weight_decay=1e-3, schedule="constant")


def test_mask_hook_holds_zeros_through_momentum_and_weight_decay(learnable_set):
    model = lenet5()
    keys = list(model.state_dict())
    masks = magnitude_masks(model, 0.7)
    hook = MaskHook(model, masks)
    before = {n: m.weight.detach().clone() for n, m in weight_layers(model).items()}
    Trainer(model, TRAIN, learnable_set, hooks=[hook], progress=False).fit()
    for name, m in weight_layers(model).items():
        w = m.weight
        assert (w.detach()[~masks[name]] == 0).all(), name
        assert not torch.signbit(w.detach()[~masks[name]]).any(), name
        assert w.grad is not None and (w.grad[~masks[name]] == 0).all(), name
        assert w.grad[masks[name]].abs().sum() > 0, name
        assert not torch.equal(w.detach()[masks[name]], before[name][masks[name]]), name  # it did train
    model = hook.finalize()
    for name, m in weight_layers(model).items():
        assert not m.weight._backward_hooks, name
        assert not parametrize.is_parametrized(m)
        assert (m.weight.detach()[~masks[name]] == 0).all()
    assert list(model.state_dict()) == keys
    copy.deepcopy(model)  # an ordinary module: no closures left that would block copying

    # With the hooks gone, further training revives pruned weights: proof they were removed.
    Trainer(model, TrainConfig(epochs=1, batch_size=64, lr=0.05, schedule="constant"), learnable_set, progress=False).fit()
    assert any((m.weight.detach()[~masks[n]] != 0).any() for n, m in weight_layers(model).items())


def test_without_mask_hook_training_revives_pruned_weights(learnable_set):
    """Control for the test above: zeros alone do not survive momentum SGD."""
    model = lenet5()
    masks = magnitude_masks(model, 0.7)
    apply_masks(model, masks)
    Trainer(model, TRAIN, learnable_set, progress=False).fit()
    assert any((m.weight.detach()[~masks[n]] != 0).any() for n, m in weight_layers(model).items())


def test_mask_hook_update_swaps_masks():
    net = small_net()
    hook = MaskHook(net, magnitude_masks(net, 0.2))
    assert sum(len(m.weight._backward_hooks or {}) for m in weight_layers(net).values()) == 3
    hook.update(magnitude_masks(net, 0.6))
    assert sum(len(m.weight._backward_hooks or {}) for m in weight_layers(net).values()) == 3  # replaced, not stacked
    assert zeros_per_layer(net) == {"0": round(0.6 * 27), "3": round(0.6 * 480), "5": round(0.6 * 30)}
    hook.finalize()
    assert all(not m.weight._backward_hooks for m in weight_layers(net).values())


# -- AGP schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0, 1, 3, 5, 7, 9, 10])
def test_agp_fraction_cubic(step):
    p = step / 10
    assert agp_fraction(step, 0, 10) == pytest.approx(1 - (1 - p) ** 3)


def test_agp_fraction_bounds_and_offset():
    assert agp_fraction(-5, 0, 10) == 0.0
    assert agp_fraction(4, 4, 20) == 0.0
    assert agp_fraction(12, 4, 20) == pytest.approx(1 - 0.5**3)
    assert agp_fraction(20, 4, 20) == 1.0
    assert agp_fraction(1000, 4, 20) == 1.0
    values = [agp_fraction(s, 0, 50) for s in range(51)]
    assert values == sorted(values)  # monotone


def test_gradual_pruning_hook_follows_schedule():
    net = small_net()
    target = 0.8
    hook = GradualPruningHook(net, lambda f: magnitude_masks(net, target * f), start=0, end=8, frequency=2)
    assert sum(zeros_per_layer(net).values()) == 0
    trainer = SimpleNamespace(step=0)
    for step in range(1, 13):
        trainer.step = step
        hook.after_step(trainer)
        # Masks are recomputed on steps 2, 4, 6, 8 only.
        last = min(step - step % 2, 8)
        expected = {n: round(target * agp_fraction(last, 0, 8) * m.weight.numel()) for n, m in weight_layers(net).items()}
        assert zeros_per_layer(net) == expected, step
    hook.finalize()
    assert zeros_per_layer(net) == {n: round(target * m.weight.numel()) for n, m in weight_layers(net).items()}


# -- MagnitudePrune end to end -------------------------------------------------------------------
def assert_exact_layer_sparsity(model: nn.Module, sparsity: float) -> None:
    for name, m in weight_layers(model).items():
        assert int((m.weight == 0).sum()) == int(round(sparsity * m.weight.numel())), name


@pytest.mark.parametrize("batch_size", [256, 32])  # 256: one step in all (an empty AGP ramp)
def test_agp_with_finetune_reaches_target(learnable_set, batch_size):
    model = lenet5()
    cfg = MagnitudePrune(sparsity=0.75, schedule="agp", finetune=TrainConfig(epochs=1, batch_size=batch_size, lr=0.02))
    out = apply_method(model, cfg, Context(data=bundle(learnable_set), progress=False))
    assert_exact_layer_sparsity(out, 0.75)
    assert all(not m.weight._backward_hooks for m in weight_layers(out).values())
    assert sum(zeros_per_layer(model).values()) == 0  # caller's model untouched


def test_agp_global_reaches_overall_target(learnable_set):
    model = lenet5()
    cfg = MagnitudePrune(sparsity=0.6, granularity="global", schedule="agp", finetune=TrainConfig(epochs=1, batch_size=32, lr=0.02))
    out = apply_method(model, cfg, Context(data=bundle(learnable_set), progress=False))
    layers = weight_layers(out)
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(zeros_per_layer(out).values())
    assert abs(zeros - round(0.6 * total)) <= len(layers)


def test_iterative_with_finetune_reaches_target_and_keeps_zeros(learnable_set):
    model = lenet5()
    cfg = MagnitudePrune(
        sparsity=0.6, schedule="iterative", iterations=2, finetune=TrainConfig(epochs=1, batch_size=64, lr=0.02, weight_decay=1e-3)
    )
    out = apply_method(model, cfg, Context(data=bundle(learnable_set), progress=False))
    assert_exact_layer_sparsity(out, 0.6)
    assert all(not m.weight._backward_hooks for m in weight_layers(out).values())
    assert all(not torch.signbit(m.weight.detach()[m.weight.detach() == 0]).any() for m in weight_layers(out).values())


def test_oneshot_with_finetune_keeps_the_oneshot_mask(learnable_set):
    model = lenet5()
    expected = magnitude_masks(model, 0.5)
    cfg = MagnitudePrune(sparsity=0.5, finetune=TrainConfig(epochs=1, batch_size=64, lr=0.02))
    out = apply_method(model, cfg, Context(data=bundle(learnable_set), progress=False))
    for name, m in weight_layers(out).items():
        assert torch.equal(m.weight.detach() != 0, expected[name]), name


def test_oneshot_without_finetune_layer_sparsity():
    out = apply_method(small_net(), MagnitudePrune(sparsity=0.5, layer_sparsity={"5": 0.1}))
    assert zeros_per_layer(out) == {"0": round(0.5 * 27), "3": 240, "5": 3}


@pytest.mark.parametrize("schedule", ["agp", "iterative"])
def test_gradual_schedules_need_finetune(schedule):
    with pytest.raises(InputError, match="finetune"):
        MagnitudePrune(sparsity=0.5, schedule=schedule)


def test_finetune_without_data():
    cfg = MagnitudePrune(sparsity=0.5, finetune=TrainConfig(epochs=1))
    with pytest.raises(InputError, match="data"):
        apply_method(small_net(), cfg)
    with pytest.raises(InputError, match="data"):
        apply_method(small_net(), MagnitudePrune(sparsity=0.5, schedule="agp", finetune=TrainConfig(epochs=1)))
