"""N:M masks, sparsity regularisers, lottery tickets and per-layer sensitivity, on tiny models and synthetic data."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from deepshrink.analysis.sensitivity import SensitivityResult, layer_sensitivity, layer_sparsities_for_target, plot_sensitivity
from deepshrink.compress.prune import (
    BNScaleL1Regularizer,
    GroupLassoRegularizer,
    L1Regularizer,
    LotteryTicket,
    MagnitudePrune,
    NMPrune,
    Regularize,
    find_ticket,
    magnitude_masks,
    nm_mask,
    nm_masks,
    rewind,
    round_sparsities,
    satisfies_nm,
    sparsity_of,
    surviving_magnitude_masks,
)
from deepshrink.compress.prune import lottery as lottery_module
from deepshrink.compress.prune.lottery import snapshot
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import DataBundle, ImageSet
from deepshrink.evaluate.accuracy import evaluate_accuracy
from deepshrink.pipeline.recipe import parse_recipe
from deepshrink.train import TrainConfig, Trainer
from tests.conftest import make_learnable_set

pytestmark = pytest.mark.unit
FAST = {"batch_size": 32, "weight_decay": 0.0, "schedule": "constant", "channels_last": False}


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 4))


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2),  # "0": 9 weights per filter
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2),  # "3": 72 weights per filter
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 4),  # "8"
    )


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def bundle(data: ImageSet) -> DataBundle:
    return DataBundle("synthetic", data, data.subset(64), data.subset(64), 4, (0.0,), (1.0,))


# -- N:M -------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_mask_keeps_the_n_largest_of_every_group(n, m):
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(n * 10 + m))
    mask = nm_mask(weight, n, m)
    groups, kept = weight.abs().reshape(-1, m), mask.reshape(-1, m)
    assert mask.shape == weight.shape and mask.dtype == torch.bool
    assert (kept.sum(1) == n).all()
    smallest_kept = groups.masked_fill(~kept, math.inf).min(1).values
    largest_dropped = groups.masked_fill(kept, -math.inf).max(1).values
    assert (smallest_kept >= largest_dropped).all()


def test_nm_conv_groups_run_over_the_flattened_in_kh_kw_filter():
    conv = nn.Conv2d(2, 3, 2, bias=False)  # 8 weights per filter, in-major: (in, kh, kw)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(24, dtype=torch.float32).view(3, 2, 2, 2))
    mask = nm_masks(nn.Sequential(conv), 2, 4)["0"]
    # Group 1 of a filter is input channel 0's 2x2 window, group 2 is channel 1's: the last two of each win.
    expected = torch.tensor([False, False, True, True] * 2).repeat(3, 1).view(3, 2, 2, 2)
    assert torch.equal(mask, expected)


def test_nm_ties_keep_the_earlier_position():
    weight = torch.ones(2, 8)
    assert torch.equal(nm_mask(weight, 1, 4), torch.tensor([True, False, False, False] * 2).repeat(2, 1))


def test_nm_masks_cover_scope_and_name_indivisible_layers():
    model = cnn()
    masks = nm_masks(model, 2, 4, Scope(exclude="^0$"))
    assert set(masks) == {"3", "8"} and sparsity_of(masks) == 0.5
    with pytest.raises(InputError, match=r"layer '0' has 9 input weights per output, not divisible by M=4"):
        nm_masks(model, 2, 4)


@pytest.mark.parametrize(("n", "m"), [(3, 2), (4, 4), (0, 4), (-1, 4)])
def test_nm_rejects_bad_ratios(n, m):
    with pytest.raises(InputError, match=r"n must be in \[1, m\)"):
        NMPrune(n=n, m=m)
    with pytest.raises(InputError, match=r"n must be in \[1, m\)"):
        nm_masks(mlp(), n, m)


def test_nm_prune_finetunes_with_the_pattern_held(learnable_set):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    cfg = NMPrune(n=2, m=4, finetune=TrainConfig(epochs=2, lr=0.05, **FAST))
    pruned = apply_method(model, cfg, Context(bundle(learnable_set), progress=False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    for layer in weight_layers(pruned).values():
        assert satisfies_nm(layer.weight, 2, 4)
        assert int((layer.weight == 0).sum()) == layer.weight.numel() // 2
        assert not layer.weight._backward_hooks  # finalize removed the gradient hooks
    assert evaluate_accuracy(pruned, learnable_set).top1 > 90.0
    assert cfg.sparsity == 0.5


def test_new_step_kinds_parse_in_recipes():
    recipe = parse_recipe(
        {
            "name": "r",
            "version": 1,
            "steps": [{"nm_prune": {"n": 1, "m": 4}}, {"lottery": {"sparsity": 0.8, "rounds": 2, "train": {"epochs": 1}}}],
        }
    )
    (_, nm), (_, lottery) = recipe.steps
    assert isinstance(nm, NMPrune) and nm.sparsity == 0.75
    assert isinstance(lottery, LotteryTicket) and lottery.train.epochs == 1
    with pytest.raises(
        InputError, match=r"steps\[0\].nm_prune.n must be in \[1, m\) for N:M sparsity \(keep n of every m weights\), got 4:2"
    ):
        parse_recipe({"name": "r", "version": 1, "steps": [{"nm_prune": {"n": 4, "m": 2}}]})
    with pytest.raises(InputError, match=r"steps\[0\].lottery.rewind_epoch must be in \[0, train.epochs=1\]"):
        parse_recipe({"name": "r", "version": 1, "steps": [{"lottery": {"sparsity": 0.5, "rewind_epoch": 2, "train": {"epochs": 1}}}]})


# -- regularisers ----------------------------------------------------------------------
def test_penalties_equal_their_closed_forms():
    model = cnn()
    layers = weight_layers(model)
    l1 = sum(float(v.abs()) for m in layers.values() for v in m.weight.detach().flatten())
    group = sum(
        math.sqrt(sum(float(v) ** 2 for v in m.weight.detach()[o].flatten())) for m in layers.values() for o in range(m.weight.shape[0])
    )
    gammas = sum(float(v.abs()) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for v in m.weight.detach())
    for hook, expected in (
        (L1Regularizer(model, 0.3), l1),
        (GroupLassoRegularizer(model, 0.3), group),
        (BNScaleL1Regularizer(model, 0.3), gammas),
    ):
        assert float(hook.penalty().detach()) == pytest.approx(expected, rel=1e-5)
        assert float(hook.extra_loss(None, None, None, None).detach()) == pytest.approx(0.3 * expected, rel=1e-5)
    only_linear = L1Regularizer(model, 1.0, Scope(types=("Linear",)))
    assert float(only_linear.penalty().detach()) == pytest.approx(float(layers["8"].weight.detach().abs().sum()), rel=1e-6)


def test_regulariser_errors():
    with pytest.raises(InputError, match="strength must be >= 0"):
        L1Regularizer(mlp(), -1.0)
    with pytest.raises(InputError, match="no affine BatchNorm"):
        BNScaleL1Regularizer(mlp(), 1.0)
    with pytest.raises(InputError, match="no layers in scope"):
        GroupLassoRegularizer(mlp(), 1.0, Scope(types=("Conv2d",)))
    assert L1Regularizer(mlp(), 0.0).extra_loss(None, None, None, None) is None


def _train_with(make, strength: float, data: ImageSet):
    model = cnn()
    hook = make(model, strength)
    Trainer(model, TrainConfig(epochs=5, lr=0.05, **FAST), data, hooks=[hook], progress=False).fit()
    return model, hook


@pytest.mark.parametrize(
    ("make", "strength"),
    [(L1Regularizer, 0.05), (GroupLassoRegularizer, 0.5), (BNScaleL1Regularizer, 0.2)],
    ids=["l1", "group_lasso", "bn_scale"],
)
def test_a_large_strength_shrinks_the_target(learnable_set, make, strength):
    _, plain = _train_with(make, 0.0, learnable_set)
    model, regularised = _train_with(make, strength, learnable_set)
    assert float(regularised.penalty().detach()) < 0.4 * float(plain.penalty().detach())
    if make is GroupLassoRegularizer:  # whole filters end near zero: below a tenth of the layer's unregularised mean norm
        norms = [[torch.linalg.vector_norm(w.detach().flatten(1), dim=1) for w in h.params] for h in (regularised, plain)]
        near_zero = sum(int((reg < 0.1 * ref.mean()).sum()) for reg, ref in zip(*norms, strict=True))
        assert near_zero >= 0.25 * sum(len(n) for n in norms[0])
        assert all((ref > 0.1 * ref.mean()).all() for ref in norms[1])


def test_a_finetune_step_regularises_from_its_config(learnable_set):
    """``finetune: {regularize: ...}`` in a recipe builds the same hook: BN-scale L1 shrinks the gammas."""
    train = {"epochs": 5, "lr": 0.05, **FAST}
    steps = [{"finetune": {"train": train}}, {"finetune": {"train": train, "regularize": {"kind": "bn_scale", "strength": 0.2}}}]
    (_, plain), (_, regularised) = parse_recipe({"name": "r", "version": 1, "steps": steps}).steps
    assert regularised.regularize == Regularize(kind="bn_scale", strength=0.2)
    gammas = [
        float(BNScaleL1Regularizer(apply_method(cnn(), cfg, Context(bundle(learnable_set), progress=False)), 1.0).penalty().detach())
        for cfg in (plain, regularised)
    ]
    assert gammas[1] < 0.4 * gammas[0]
    with pytest.raises(InputError, match=r"steps\[0\].finetune.regularize.kind"):
        parse_recipe({"name": "r", "version": 1, "steps": [{"finetune": {"regularize": {"kind": "l2"}}}]})
    assert isinstance(Regularize(kind="group_lasso").hook(cnn()), GroupLassoRegularizer)


# -- lottery ticket --------------------------------------------------------------------
def test_round_sparsities_remove_a_fixed_fraction_of_survivors():
    levels = round_sparsities(0.9, 3)
    assert levels[-1] == 0.9 and len(levels) == 3
    remaining = [1.0] + [1 - s for s in levels]
    ratios = [b / a for a, b in zip(remaining, remaining[1:], strict=False)]
    assert ratios == pytest.approx([0.1 ** (1 / 3)] * 3)
    assert round_sparsities(0.5, 1) == [0.5]


@pytest.mark.parametrize("granularity", ["layer", "global"])
def test_surviving_masks_are_exact_and_never_revive(granularity):
    model = mlp()
    first = surviving_magnitude_masks(model, None, 0.5, granularity=granularity)
    with torch.no_grad():  # training moved weights: make pruned ones large and one survivor exactly zero
        w = model[1].weight
        w[~first["1"]] = 10.0
        survivor = first["1"].nonzero()[0]
        w[tuple(survivor)] = 0.0
    second = surviving_magnitude_masks(model, first, 0.75, granularity=granularity)
    for name in first:
        assert not (second[name] & ~first[name]).any(), name  # monotone
    total = sum(m.numel() for m in second.values())
    assert sum(int((~m).sum()) for m in second.values()) == round(0.75 * total)
    if granularity == "layer":
        assert all(int((~m).sum()) == round(0.75 * m.numel()) for m in second.values())
    assert not second["1"][tuple(survivor)]  # the zero survivor ranks lowest among survivors


def test_rewind_restores_survivors_and_zeroes_the_pruned():
    model = cnn()
    state = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(5.0)
    masks = magnitude_masks(model, 0.6)
    rewind(model, state, masks)
    layers = weight_layers(model)
    for name, mask in masks.items():
        w = layers[name].weight.detach()
        assert torch.equal(w[mask], state[f"{name}.weight"][mask])
        assert (w[~mask] == 0).all()
    assert torch.equal(model[1].running_mean, state["1.running_mean"])
    assert torch.equal(model[0].bias, state["0.bias"])


@pytest.mark.parametrize("rewind_epoch", [0, 1])
def test_find_ticket_reaches_the_exact_sparsity(learnable_set, monkeypatch, rewind_epoch):
    model = mlp()
    initial = snapshot(model)
    rewinds = []

    def spy(m, state, masks):
        rewind(m, state, masks)
        rewinds.append((snapshot(m), state, masks))

    monkeypatch.setattr(lottery_module, "rewind", spy)
    cfg = LotteryTicket(sparsity=0.8, rounds=3, rewind_epoch=rewind_epoch, train=TrainConfig(epochs=2, lr=0.05, **FAST))
    result = find_ticket(model, cfg, bundle(learnable_set), progress=False)
    assert len(result.history) == 4 and len(result.masks) == 3 and len(rewinds) == 3
    assert result.sparsities[-1] == pytest.approx(0.8, abs=1e-4)
    for earlier, later in zip(result.masks, result.masks[1:], strict=False):
        assert all(not (later[n] & ~earlier[n]).any() for n in earlier)  # monotone across rounds
    final = result.masks[-1]
    for name, layer in weight_layers(model).items():
        assert int((layer.weight == 0).sum()) == round(0.8 * layer.weight.numel()) == int((~final[name]).sum())
    after_last_rewind, rewind_state, masks = rewinds[-1]
    assert all(state is rewind_state for _, state, _ in rewinds)  # one rewind point for every round
    if rewind_epoch == 0:
        assert all(torch.equal(rewind_state[k], initial[k]) for k in initial)
    else:
        assert not torch.equal(rewind_state["1.weight"], initial["1.weight"])
    for name in masks:
        w = after_last_rewind[f"{name}.weight"]
        assert torch.equal(w[masks[name]], rewind_state[f"{name}.weight"][masks[name]])
    assert evaluate_accuracy(model, learnable_set).top1 > 90.0


def test_lottery_config_and_data_errors():
    with pytest.raises(InputError, match="rounds must be >= 1"):
        LotteryTicket(sparsity=0.5, rounds=0)
    with pytest.raises(InputError, match=r"sparsity must be in \[0.0, 1.0\)"):
        LotteryTicket(sparsity=1.0)
    with pytest.raises(InputError, match="pass data="):
        apply_method(mlp(), LotteryTicket(sparsity=0.5, train=TrainConfig(epochs=1)))


# -- sensitivity -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_cnn():
    data = make_learnable_set(192, seed=7)
    model = cnn()
    Trainer(model, TrainConfig(epochs=3, lr=0.05, **FAST), data, progress=False).fit()
    return model, data


def test_layer_sensitivity_prunes_one_layer_on_a_copy(trained_cnn):
    model, data = trained_cnn
    before = copy.deepcopy(model.state_dict())
    result = layer_sensitivity(model, data, sparsities=(0.9, 0.5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(result.layers) == {"0", "3", "8"} and result.samples == len(data)
    assert result.baseline_top1 == evaluate_accuracy(model, data).top1
    assert [s for s, _ in result.layers["3"]] == [0.5, 0.9]
    assert result.params == {"0": 72, "3": 288, "8": 64}
    reference = copy.deepcopy(model)
    masks = magnitude_masks(reference, 0.0, layer_sparsity={"3": 0.9})
    with torch.no_grad():
        reference[3].weight.masked_fill_(~masks["3"], 0.0)
    assert result.layers["3"][1][1] == evaluate_accuracy(reference, data).top1
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["layers"]["8"]["params"] == 64 and len(payload["layers"]["8"]["points"]) == 2
    with pytest.raises(InputError, match=r"must be in \(0, 1\)"):
        layer_sensitivity(model, data, sparsities=(0.0, 0.5))


def test_plot_sensitivity_writes_a_png(trained_cnn, tmp_path):
    model, data = trained_cnn
    path = plot_sensitivity(layer_sensitivity(model, data, sparsities=(0.3, 0.8)), tmp_path / "plots" / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def synthetic_result() -> SensitivityResult:
    """'wide' (900 weights) barely cares; 'narrow' (100 weights) collapses past 30%."""
    levels = (0.1, 0.3, 0.5, 0.7, 0.9)
    return SensitivityResult(
        90.0,
        1000,
        {
            "wide": [(s, 90.0 - 2 * s) for s in levels],
            "narrow": [(0.1, 89.5), (0.3, 88.0), (0.5, 60.0), (0.7, 30.0), (0.9, 10.0)],
        },
        {"wide": 900, "narrow": 100},
    )


@pytest.mark.parametrize("target", [0.0, 0.3, 0.6, 0.8])
def test_layer_sparsities_meet_the_weighted_target_spending_on_robust_layers(target):
    result = synthetic_result()
    ratios = layer_sparsities_for_target(result, target)
    assert set(ratios) == {"wide", "narrow"}
    weighted = sum(ratios[n] * result.params[n] for n in ratios) / sum(result.params.values())
    assert weighted == pytest.approx(target, abs=1e-9)
    if target:
        assert ratios["wide"] >= target >= ratios["narrow"]
    MagnitudePrune(sparsity=0.0, layer_sparsity=ratios)  # valid as a config


def test_layer_sparsities_respect_max_drop_and_report_unreachable_targets():
    result = synthetic_result()
    ratios = layer_sparsities_for_target(result, 0.83, max_drop=3.0)
    assert ratios["narrow"] <= 0.3 and ratios["wide"] == pytest.approx((0.83 * 1000 - 100 * ratios["narrow"]) / 900)
    with pytest.raises(InputError, match="cannot reach sparsity 0.9 within max_drop 3.0: the measured levels reach 0.840 at most"):
        layer_sparsities_for_target(result, 0.9, max_drop=3.0)
