"""Typed method configs: from_dict validation with key paths, Scope selection, apply_method."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from deepshrink.compress.prune import MagnitudePrune
from deepshrink.compress.share import KMeansShare
from deepshrink.core.config import Config, Scope, check_range
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method, method
from deepshrink.train import TrainConfig

pytestmark = pytest.mark.unit

PATH = "steps[0].prune"


def build(values: dict, cls=MagnitudePrune, path: str = PATH):
    return cls.from_dict(values, path)


def error_of(values: dict, cls=MagnitudePrune, path: str = PATH) -> str:
    with pytest.raises(InputError) as info:
        build(values, cls, path)
    message = str(info.value)
    assert "\n" not in message
    return message


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),  # "0"
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),  # "2"
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),  # "4"
        nn.ReLU(),
        nn.Linear(16, 3),  # "6"
    )


# -- from_dict: building and coercion ---------------------------------------------
def test_from_dict_builds_nested_configs():
    cfg = build(
        {
            "sparsity": 0.5,
            "granularity": "layer",
            "scope": {"types": ["Linear"], "include": "fc", "exclude": "head"},
            "layer_sparsity": {"fc1": 0.25},
            "schedule": "iterative",
            "iterations": 2,
            "finetune": {"epochs": 2, "lr": 1, "schedule": "cosine"},
        }
    )
    assert isinstance(cfg, MagnitudePrune)
    assert isinstance(cfg.scope, Scope)
    assert cfg.scope == Scope(types=("Linear",), include="fc", exclude="head")
    assert isinstance(cfg.scope.types, tuple)  # list -> tuple
    assert isinstance(cfg.finetune, TrainConfig)
    assert cfg.finetune.epochs == 2 and cfg.finetune.schedule == "cosine"
    assert cfg.finetune.lr == 1.0 and type(cfg.finetune.lr) is float  # int accepted for a float
    assert cfg.layer_sparsity == {"fc1": 0.25}
    assert cfg.granularity == "layer" and cfg.schedule == "iterative" and cfg.iterations == 2


def test_global_granularity_rejects_per_layer_targets():
    with pytest.raises(InputError, match="steps\\[0\\].prune.layer_sparsity sets per-layer targets"):
        build({"sparsity": 0.5, "granularity": "global", "layer_sparsity": {"fc1": 0.25}})


def test_from_dict_defaults_and_null_optional():
    cfg = build({"sparsity": 0, "finetune": None})
    assert cfg.sparsity == 0.0 and type(cfg.sparsity) is float
    assert cfg.finetune is None
    assert cfg.scope == Scope()
    assert cfg.granularity == "layer"


def test_from_dict_round_trips_through_to_dict():
    cfg = build({"sparsity": 0.3, "finetune": {"epochs": 1}})
    again = MagnitudePrune.from_dict(cfg.to_dict())
    assert again == cfg


def test_passing_an_already_built_nested_config_is_kept():
    scope = Scope(types=("Conv2d",))
    assert build({"sparsity": 0.5, "scope": scope}).scope is scope


def test_bool_is_not_an_int():
    message = error_of({"sparsity": 0.5, "iterations": True})
    assert "steps[0].prune.iterations" in message


def test_bool_is_not_a_float():
    assert "steps[0].prune.sparsity" in error_of({"sparsity": True})


def test_float_is_not_an_int():
    assert "steps[0].prune.iterations" in error_of({"sparsity": 0.5, "iterations": 2.0})


def test_list_items_are_type_checked_with_index():
    message = error_of({"sparsity": 0.5, "scope": {"types": ["Linear", 3]}})
    assert "steps[0].prune.scope.types[1]" in message


# -- from_dict: errors name the full key path ----------------------------------------
def test_unknown_key_names_path_and_key():
    message = error_of({"sparsity": 0.5, "sparsty": 0.5})
    assert "steps[0].prune" in message and "sparsty" in message
    assert "sparsity" in message  # lists the allowed keys


def test_unknown_nested_key_names_nested_path():
    message = error_of({"sparsity": 0.5, "scope": {"inclde": "fc"}})
    assert "steps[0].prune.scope" in message and "inclde" in message


def test_unknown_key_inside_optional_finetune_names_nested_path():
    message = error_of({"sparsity": 0.5, "finetune": {"epoch": 3}})
    assert "steps[0].prune.finetune" in message and "epoch" in message
    assert "unknown" in message


def test_wrong_type_inside_optional_finetune_names_full_path():
    assert "steps[0].prune.finetune.lr" in error_of({"sparsity": 0.5, "finetune": {"lr": "fast"}})


def test_wrong_type_names_path():
    message = error_of({"sparsity": "half"})
    assert "steps[0].prune.sparsity" in message and "half" in message


def test_not_a_mapping():
    with pytest.raises(InputError, match=r"steps\[0\]\.prune"):
        MagnitudePrune.from_dict([0.5], PATH)  # type: ignore[arg-type]
    assert "steps[0].prune.scope" in error_of({"sparsity": 0.5, "scope": "Linear"})


def test_literal_mismatch_names_path_and_choices():
    message = error_of({"sparsity": 0.5, "granularity": "channel"})
    assert "steps[0].prune.granularity" in message
    assert "channel" in message and "global" in message


def test_literal_mismatch_nested():
    assert "steps[0].prune.finetune.optimizer" in error_of({"sparsity": 0.5, "finetune": {"optimizer": "lbfgs"}})


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range(sparsity):
    message = error_of({"sparsity": sparsity})
    assert "steps[0].prune.sparsity" in message
    assert str(sparsity) in message


def test_layer_sparsity_out_of_range_names_layer():
    assert "steps[0].prune.layer_sparsity.fc1" in error_of({"sparsity": 0.5, "layer_sparsity": {"fc1": 1.0}})


def test_share_bits_out_of_range_names_path():
    message = error_of({"linear_bits": 0}, KMeansShare, "steps[1].share")
    assert "steps[1].share.linear_bits" in message
    assert "steps[1].share.conv_bits" in error_of({"conv_bits": 17}, KMeansShare, "steps[1].share")


def test_missing_required_key():
    assert "sparsity" in error_of({})


def test_default_path_is_class_name():
    with pytest.raises(InputError, match=r"^MagnitudePrune\.sparsity"):
        MagnitudePrune.from_dict({"sparsity": 2.0})


def test_direct_construction_validates_too():
    with pytest.raises(InputError):
        MagnitudePrune(sparsity=1.0)
    with pytest.raises(InputError):
        MagnitudePrune(sparsity=0.5, iterations=0)


@pytest.mark.parametrize(
    ("value", "low", "high", "inclusive", "ok"),
    [(0.0, 0.0, 1.0, False, True), (1.0, 0.0, 1.0, False, False), (1.0, 0.0, 1.0, True, True), (-1e-9, 0.0, 1.0, True, False)],
)
def test_check_range(value, low, high, inclusive, ok):
    if ok:
        check_range("x", value, low, high, inclusive)
    else:
        with pytest.raises(InputError, match=r"^x must be in"):
            check_range("x", value, low, high, inclusive)


# -- Scope --------------------------------------------------------------------------------
def names_in(scope: Scope, model: nn.Module) -> list[str]:
    return [name for name, _ in scope.layers(model)]


def test_scope_default_selects_conv_and_linear_in_order():
    assert names_in(Scope(), small_net()) == ["0", "2", "4", "6"]


def test_scope_types():
    net = small_net()
    assert names_in(Scope(types=("Linear",)), net) == ["4", "6"]
    assert names_in(Scope(types=("Conv2d",)), net) == ["0", "2"]


def test_scope_include_exclude_regex():
    net = small_net()
    assert names_in(Scope(include=r"^[02]$"), net) == ["0", "2"]
    assert names_in(Scope(exclude=r"^6$"), net) == ["0", "2", "4"]
    assert names_in(Scope(include=r"[0-4]", exclude=r"2"), net) == ["0", "4"]
    assert names_in(Scope(types=("Linear",), include="0"), net) == []


def test_scope_regex_on_named_submodules():
    net = nn.Sequential()
    net.add_module("features", nn.Sequential(nn.Conv2d(1, 2, 3)))
    net.add_module("classifier", nn.Linear(2, 2))
    net.add_module("head", nn.Linear(2, 2))
    assert names_in(Scope(include="features"), net) == ["features.0"]
    assert names_in(Scope(exclude="^(classifier|head)$"), net) == ["features.0"]
    assert names_in(Scope(exclude="head"), net) == ["features.0", "classifier"]


def test_scope_invalid_regex():
    with pytest.raises(InputError, match="include"):
        Scope(include="fc(")
    with pytest.raises(InputError, match="exclude"):
        Scope(exclude="[")
    assert "steps[0].prune.scope.include" in error_of({"sparsity": 0.5, "scope": {"include": "(("}})


def test_scope_unknown_type():
    with pytest.raises(InputError, match="Conv3d"):
        Scope(types=("Conv3d",))


# -- apply_method ----------------------------------------------------------------------------
def test_apply_method_never_modifies_callers_model():
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruned = apply_method(net, MagnitudePrune(sparsity=0.5))
    assert pruned is not net
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.count_nonzero(m.weight) > 0.9 * m.weight.numel() for m in (net[0], net[2], net[4], net[6]))
    # ...while the returned copy was pruned.
    zeros = sum(int((m.weight == 0).sum()) for m in (pruned[0], pruned[2], pruned[4], pruned[6]))
    total = sum(m.weight.numel() for m in (net[0], net[2], net[4], net[6]))
    assert zeros >= 0.5 * total - 4


def test_apply_method_unknown_config_type():
    @dataclass(frozen=True)
    class Unregistered(Config):
        x: int = 1

    with pytest.raises(InputError, match="Unregistered"):
        apply_method(small_net(), Unregistered())
    with pytest.raises(InputError):
        apply_method(small_net(), {"sparsity": 0.5})


def test_register_passes_a_copy_and_context():
    @dataclass(frozen=True)
    class Probe(Config):
        pass

    seen = {}

    @method("probe", Probe)
    class ProbeMethod:
        def torch(self, model, cfg, ctx):
            seen["model"], seen["ctx"] = model, ctx
            return model

    net = small_net()
    ctx = Context(data="bundle", progress=False)
    out = apply_method(net, Probe(), ctx)
    assert out is seen["model"] and out is not net
    assert seen["ctx"] is ctx
    apply_method(net, Probe())
    assert isinstance(seen["ctx"], Context) and seen["ctx"].data is None
    with pytest.raises(ValueError, match="already registered"):
        method("probe", Probe)(ProbeMethod)
