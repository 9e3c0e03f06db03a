"""Structured pruning: channel groups, importance criteria, physical surgery, block removal.

The key check is exactness: channels whose activations are exactly zero (producer
filters, biases, BN gamma and beta zeroed) can be removed without changing the
output, so the coupled edits (residual adds, depthwise convs, flatten -> linear,
cat) are proven consistent on every zoo model.
"""

import copy

import pytest
import torch
from torch import nn

from deepshrink.compress.prune import (
    ChannelGroup,
    ChannelPrune,
    channel_groups,
    channel_scores,
    prune_channels,
    remove_blocks,
    select_channels,
)
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import DataBundle, ImageSet, iterate_batches
from deepshrink.evaluate.flops import count_compute
from deepshrink.export.onnx import onnx_bytes, ort_session, verify_onnx
from deepshrink.models import create_model, list_models
from deepshrink.pipeline.recipe import parse_recipe
from deepshrink.train import TrainConfig

pytestmark = pytest.mark.unit

SHAPE = (1, 28, 28)
MODELS = list_models()


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN state (statistics, gamma, beta), so equivalence checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_bn(create_model(name, **kwargs), seed)


def inputs(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def widths(model: nn.Module) -> list[torch.Size]:
    return [m.weight.shape for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def tiny_bundle(n: int = 16, classes: int = 10) -> DataBundle:
    g = torch.Generator().manual_seed(7)
    data = ImageSet(torch.randn(n, *SHAPE, generator=g), torch.randint(0, classes, (n,), generator=g))
    return DataBundle("random", data, data.subset(8), data.subset(8), classes, (0.0,), (1.0,))


@torch.no_grad()
def zero_channels(model: nn.Module, group: ChannelGroup, channels: torch.Tensor) -> None:
    """Make the channels exactly zero after BN/ReLU: zero producer filters and biases, BN gamma and beta."""
    modules = dict(model.named_modules())
    for member in group.members:
        if member.kind in ("out", "bn"):
            index = member.indices(channels)
            for tensor in (modules[member.module].weight, modules[member.module].bias):
                if tensor is not None:
                    tensor[index] = 0.0


def zero_and_prune(model: nn.Module, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Zero about half of every prunable group's channels, then prune exactly those: (zeroed, pruned)."""
    g = torch.Generator().manual_seed(seed)
    groups = channel_groups(model, inputs(2))
    keep = {}
    for i, group in enumerate(groups):
        if group.prunable and group.size > 1:
            order = torch.randperm(group.size, generator=g)
            cut = max(1, group.size // 2)
            zero_channels(model, group, order[:cut])
            keep[i] = order[cut:]
    assert keep, "no prunable group"
    return model, prune_channels(copy.deepcopy(model), groups, keep)


def assert_plain_module(model: nn.Module, reference: nn.Module) -> None:
    """No hooks, no module types the original did not have."""
    assert {type(m) for m in model.modules()} <= {type(m) for m in reference.modules()} | {nn.Identity}
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


# -- end to end on every zoo model ------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_half_pruned_model_is_smaller_faster_and_exports(name):
    model = build(name)
    before = copy.deepcopy(model.state_dict())
    pruned = apply_method(model, ChannelPrune(0.5))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "caller's model was modified"
    assert n_params(pruned) < 0.6 * n_params(model)
    assert count_compute(pruned, SHAPE).macs < 0.6 * count_compute(model, SHAPE).macs
    assert forward(pruned, inputs(1)).shape == (1, 10)
    assert forward(pruned, inputs(3)).shape == (3, 10)
    assert_plain_module(pruned, model)
    proto = onnx_bytes(pruned, SHAPE)
    assert len(proto) < 0.6 * len(onnx_bytes(model, SHAPE))
    assert verify_onnx(pruned, ort_session(proto), inputs(3)) < 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_pruning_zeroed_channels_is_exact(name):
    original = build(name)
    zeroed, pruned = zero_and_prune(copy.deepcopy(original))
    x = inputs(3)
    expected = forward(zeroed, x)
    assert not torch.allclose(expected, forward(original, x), atol=1e-4), "zeroing should change the output"
    assert n_params(pruned) < n_params(zeroed)
    assert (forward(pruned, x) - expected).abs().max() < 1e-5


def test_pruning_live_channels_changes_output():
    """Control for the exactness test: removing channels that are not zero does change the output."""
    model = build("resnet20")
    groups = channel_groups(model, inputs(2))
    pruned = prune_channels(copy.deepcopy(model), groups, {i: range(g.size // 2) for i, g in enumerate(groups) if g.prunable})
    assert (forward(pruned, inputs()) - forward(model, inputs())).abs().max() > 1e-3


# -- the dependency analysis ------------------------------------------------------------
def test_resnet_residual_group_couples_shortcut_and_stage():
    model = build("resnet20")
    groups = channel_groups(model, inputs(2))
    stage2 = next(g for g in groups if "layer2.0.shortcut.0" in g.producers)
    roles = {(m.module, m.kind) for m in stage2.members}
    assert {("layer2.0.shortcut.1", "bn"), ("layer3.0.shortcut.0", "in"), ("layer3.0.conv1", "in")} <= roles
    assert {f"layer2.{b}.conv2" for b in range(3)} <= set(stage2.producers)
    stem = next(g for g in groups if "stem.0" in g.producers)
    assert {f"layer1.{b}.conv2" for b in range(3)} <= set(stem.producers)
    fixed = [g for g in groups if not g.prunable]
    assert {r for g in fixed for r in g.reasons} == {"model input", "model output"}

    pruned = apply_method(model, ChannelPrune(0.5, importance="random", seed=3))
    m = dict(pruned.named_modules())
    for stage, prev_out in (("layer1", "stem.0"), ("layer2", "layer2.0.shortcut.0"), ("layer3", "layer3.0.shortcut.0")):
        width = m[prev_out].out_channels
        assert width == model.get_submodule(prev_out).out_channels // 2
        for b in range(3):
            assert m[f"{stage}.{b}.conv2"].out_channels == m[f"{stage}.{b}.bn2"].num_features == width
            if b > 0:
                assert m[f"{stage}.{b}.conv1"].in_channels == width
        if stage != "layer1":
            assert m[f"{stage}.0.shortcut.1"].num_features == width
    assert m["layer3.0.shortcut.0"].in_channels == m["layer2.0.shortcut.0"].out_channels
    assert m["fc"].in_features == m["layer3.0.shortcut.0"].out_channels and m["fc"].out_features == 10


def test_mobilenet_depthwise_follows_its_producer():
    model = build("mobilenetv2")
    groups = channel_groups(model, inputs(2))
    expand = next(g for g in groups if "features.4.block.0" in g.producers)
    assert expand.producers == ("features.4.block.0", "features.4.block.3")  # expand conv + depthwise conv
    pruned = apply_method(model, ChannelPrune(0.5))
    dw = pruned.get_submodule("features.4.block.3")
    assert dw.groups == dw.in_channels == dw.out_channels == pruned.get_submodule("features.4.block.0").out_channels == 24


class CatNet(nn.Module):
    """Two convs concatenated, a shared BN, a conv reading both, and view(n, -1) into a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 14 * 14, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        z = nn.functional.max_pool2d(torch.relu(self.c(y)), 2)
        return self.fc(z.view(z.size(0), -1))


def test_cat_offsets_and_view_flatten_are_exact():
    model = randomise_bn(CatNet())
    groups = channel_groups(model, inputs(2))
    members = {(m.module, m.kind): (m.offset, m.repeat) for g in groups if g.prunable for m in g.members}
    assert members[("bn", "bn")] in ((0, 1), (4, 1)) and members[("c", "in")] in ((0, 1), (4, 1))
    assert members[("fc", "in")] == (0, 196)
    assert sorted(g.producers for g in groups if g.prunable) == [("a",), ("b",), ("c",)]
    zeroed, pruned = zero_and_prune(model)
    assert pruned.bn.num_features == 5 and pruned.c.in_channels == 5 and pruned.fc.in_features == 4 * 196
    assert (forward(pruned, inputs()) - forward(zeroed, inputs())).abs().max() < 1e-5


class OddNet(nn.Module):
    """Only ``e`` is safely prunable: slicing, a grouped conv, a reused conv and the output fix the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.d, self.e = (nn.Conv2d(1, 4, 3, padding=1) for _ in range(4))
        self.g = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.c = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(14, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)[:, :2]
        b = self.g(self.b(x))
        c = self.c(self.c(torch.relu(self.d(x))))
        return self.head(torch.cat([a, b, c, torch.relu(self.e(x))], 1)).mean((2, 3))


def test_unsupported_patterns_are_left_alone():
    model = OddNet().eval()
    groups = channel_groups(model, inputs(2))
    assert [g.producers for g in groups if g.prunable] == [("e",)]
    reasons = " ".join(r for g in groups for r in g.reasons)
    assert "grouped conv" in reasons and "used more than once" in reasons and "getitem" in reasons
    with pytest.raises(InputError, match="cannot be pruned"):
        prune_channels(model, groups, {i: [0] for i, g in enumerate(groups) if "b" in g.producers})
    zeroed, pruned = zero_and_prune(model)
    assert pruned.e.out_channels == 2 and pruned.head.in_channels == 12
    assert (forward(pruned, inputs()) - forward(zeroed, inputs())).abs().max() < 1e-5


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    with pytest.raises(InputError, match="torch.fx-traceable"):
        channel_groups(Branchy(), inputs(2))


# -- choosing channels ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vgg"])
def test_round_to_keeps_multiples_and_never_empties(name):
    model = build(name)
    before = [g.size for g in channel_groups(model, inputs(2)) if g.prunable]
    pruned = apply_method(model, ChannelPrune(0.3, round_to=8))
    after = [g.size for g in channel_groups(pruned, inputs(2)) if g.prunable]
    assert len(after) == len(before) and after != before
    assert all(k % 8 == 0 or k == n for k, n in zip(after, before, strict=True))
    assert all(k >= min(n, 8) for k, n in zip(after, before, strict=True))
    assert forward(pruned, inputs()).shape == (3, 10)


@pytest.mark.parametrize("granularity", ["layer", "global"])
def test_extreme_ratio_keeps_a_channel_and_the_classes(granularity):
    model = build("lenet5", num_classes=7)
    pruned = apply_method(model, ChannelPrune(0.99, granularity=granularity))
    sizes = [g.size for g in channel_groups(pruned, inputs(2)) if g.prunable]
    assert len(sizes) == 4 and all(1 <= s <= 2 for s in sizes)  # 120 - floor(0.99 * 120) = 2
    assert forward(pruned, inputs()).shape == (3, 7)


def test_ratio_zero_is_a_no_op():
    model = build("resnet20")
    pruned = apply_method(model, ChannelPrune(0.0))
    assert n_params(pruned) == n_params(model)
    assert torch.equal(forward(pruned, inputs()), forward(model, inputs()))


def test_select_layer_keeps_highest_scores():
    scores = [torch.tensor([0.5, 3.0, 0.1, 2.0, 1.0]), torch.tensor([1.0, 2.0])]
    keep = select_channels(scores, 0.4)
    assert keep[0].tolist() == [1, 3, 4] and keep[1].tolist() == [0, 1]  # floor(0.4 * 2) = 0 removed
    assert select_channels(scores, 0.4, round_to=2)[0].tolist() == [0, 1, 3, 4]


def test_select_global_uses_one_threshold_over_normalised_scores():
    uniform, uneven = torch.ones(10), torch.tensor([10.0, 10.0] + [0.01] * 8)
    keep = select_channels([uniform, uneven], 0.5, granularity="global")
    assert len(keep[0]) + len(keep[1]) == 10
    assert keep[1].tolist() == [0, 1] and len(keep[0]) == 8  # the uneven group's tiny channels go first
    assert [len(k) for k in select_channels([uniform * 100, uneven], 0.5, granularity="global")] == [8, 2]  # scale-free


def test_global_and_scope_on_vgg():
    model = build("vgg")
    pruned = apply_method(model, ChannelPrune(0.5, granularity="global", scope=Scope(include=r"^features\.(0|4)$")))
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    original = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths[2:] == original[2:] and sum(widths[:2]) == sum(original[:2]) // 2
    excluded = apply_method(model, ChannelPrune(0.5, scope=Scope(exclude="classifier")))
    assert excluded.classifier[0].in_features == 256 and excluded.classifier[0].out_features == 256


def test_iterative_with_finetune_reaches_the_oneshot_widths():
    model = build("lenet5")
    finetune = TrainConfig(epochs=1, batch_size=8, lr=0.01, channels_last=False)
    ctx = Context(data=tiny_bundle(), progress=False)
    iterative = apply_method(model, ChannelPrune(0.5, schedule="iterative", iterations=2, finetune=finetune), ctx)
    oneshot = apply_method(model, ChannelPrune(0.5))
    assert widths(iterative) == widths(oneshot)
    assert widths(oneshot)[0][0] == 3 and not torch.equal(iterative[0].weight, oneshot[0].weight)


def test_dtype_is_preserved():
    model = build("resnet20").double()
    pruned = apply_method(model, ChannelPrune(0.5))
    assert {p.dtype for p in pruned.parameters()} == {torch.float64}
    assert forward(pruned, inputs().double()).dtype == torch.float64


# -- importance criteria ----------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor", "hessian", "random"])
def test_each_criterion_scores_every_channel(criterion):
    model = build("resnet20")
    groups = [g for g in channel_groups(model, inputs(2)) if g.prunable]
    batches = list(iterate_batches(tiny_bundle().train, 8))
    scores = channel_scores(model, groups, criterion, batches=batches)
    assert [len(s) for s in scores] == [g.size for g in groups]
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores)
    assert any(s.sum() > 0 for s in scores)


def test_bn_scale_and_l1_rank_a_dead_channel_lowest():
    model = build("vgg")
    group = channel_groups(model, inputs(2))[1]  # features.4 -> features.5 -> features.8
    with torch.no_grad():
        model.get_submodule("features.5").weight[3] = 0.0
        model.get_submodule("features.4").weight[5] = 0.0
    assert int(channel_scores(model, [group], "bn_scale")[0].argmin()) == 3
    assert int(channel_scores(model, [group], "l1")[0].argmin()) == 5


def test_random_is_deterministic_per_seed():
    model = build("lenet5")
    groups = [g for g in channel_groups(model, inputs(2)) if g.prunable]
    a, b, c = (channel_scores(model, groups, "random", seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_gradient_criteria_accept_a_closure_and_leave_the_model_alone():
    model = build("mobilenetv2").train()
    model.features[1].eval()  # a frozen BN inside a training model keeps its own mode
    groups = [g for g in channel_groups(model, inputs(2)) if g.prunable][:3]
    state = copy.deepcopy(model.state_dict())
    x = inputs(4)
    scores = channel_scores(model, groups, "hessian", batches=lambda m: m(x).square().mean())
    assert [len(s) for s in scores] == [g.size for g in groups] and all(s.sum() > 0 for s in scores)
    assert model.training and model.features[0].training and not model.features[1].training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics untouched


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
def test_gradient_criteria_through_apply_method(criterion):
    model = build("lenet5")
    pruned = apply_method(model, ChannelPrune(0.5, importance=criterion), Context(data=tiny_bundle(), progress=False))
    assert n_params(pruned) < n_params(model) and forward(pruned, inputs()).shape == (3, 10)


# -- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_out_of_range(ratio):
    with pytest.raises(InputError, match="ratio"):
        ChannelPrune(ratio)


def test_config_errors():
    with pytest.raises(InputError, match="importance.*'fisher'"):
        ChannelPrune(0.5, importance="fisher")
    with pytest.raises(InputError, match=r"steps\[0\].channel_prune.importance"):
        parse_recipe({"name": "x", "version": 1, "steps": [{"channel_prune": {"ratio": 0.5, "importance": "fisher"}}]})
    with pytest.raises(InputError, match="round_to"):
        ChannelPrune(0.5, round_to=0)
    recipe = parse_recipe({"name": "x", "version": 1, "steps": [{"channel_prune": {"ratio": 0.5, "round_to": 4}}]})
    assert recipe.steps[0][1] == ChannelPrune(0.5, round_to=4)


def test_apply_errors():
    model = build("lenet5")
    with pytest.raises(InputError, match="nothing prunable in scope"):
        apply_method(model, ChannelPrune(0.5, scope=Scope(include="no-such-layer")))
    with pytest.raises(InputError, match="'taylor' needs gradients"):
        apply_method(model, ChannelPrune(0.5, importance="taylor"))
    with pytest.raises(InputError, match="bn_scale"):
        apply_method(model, ChannelPrune(0.5, importance="bn_scale"))
    with pytest.raises(InputError, match="fine-tuning needs data"):
        apply_method(model, ChannelPrune(0.5, finetune=TrainConfig(epochs=1)))
    groups = channel_groups(model, inputs(2))
    with pytest.raises(InputError, match="lose all"):
        prune_channels(model, groups, {0: []})
    with pytest.raises(InputError, match="channels 0..5"):
        prune_channels(model, groups, {0: [0, 6]})


# -- block removal ----------------------------------------------------------------------
def test_remove_blocks_drops_shape_preserving_residual_blocks():
    model = build("resnet20")
    slim = remove_blocks(copy.deepcopy(model), ["layer1.2", "layer3.1"])
    assert isinstance(slim.layer1[2], nn.Identity) and isinstance(slim.layer3[1], nn.Identity)
    assert n_params(slim) < n_params(model)
    assert forward(slim, inputs()).shape == (3, 10)
    assert verify_onnx(slim, ort_session(onnx_bytes(slim, SHAPE)), inputs()) < 1e-4
    pruned = apply_method(slim, ChannelPrune(0.5))  # the analysis passes through the Identity
    assert forward(pruned, inputs()).shape == (3, 10)


def test_remove_blocks_rejects_shape_changes_and_unknown_names():
    model = build("resnet20")
    with pytest.raises(InputError, match="'layer2.0' maps shape"):
        remove_blocks(model, "layer2.0")
    with pytest.raises(InputError, match="layer9"):
        remove_blocks(model, ["layer9"])
    assert not isinstance(model.layer2[0], nn.Identity)
