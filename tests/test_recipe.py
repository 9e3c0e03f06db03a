"""Recipes: YAML parsing and validation (unit) and run_recipe's run folder and resume (flow)."""

import json
import os

import pytest
import torch
from torch import nn

from deepshrink.compress.prune import MagnitudePrune
from deepshrink.compress.share import KMeansShare
from deepshrink.core.errors import InputError
from deepshrink.data.datasets import DataBundle, ImageSet
from deepshrink.encode.pack import unpack
from deepshrink.encode.step import Pack
from deepshrink.models import create_model
from deepshrink.models.weights import load_weights
from deepshrink.pipeline import runner
from deepshrink.pipeline.recipe import RECIPES_DIR, Recipe, load_recipe, parse_recipe
from deepshrink.train import TrainConfig

unit = pytest.mark.unit
flow = pytest.mark.flow


def recipe_dict(**overrides) -> dict:
    data = {
        "name": "tiny",
        "version": 1,
        "description": "prune, share, pack",
        "steps": [
            {"prune": {"sparsity": 0.8, "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.02, "schedule": "constant"}}},
            {"share": {"linear_bits": 4}},
            {"pack": {}},
        ],
    }
    data.update(overrides)
    return data


def parse_error(data, origin: str = "recipe") -> str:
    with pytest.raises(InputError) as info:
        parse_recipe(data, origin)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- parsing (unit) -------------------------------------------------------------------------------
@unit
def test_shipped_deep_compression_recipe():
    recipe = load_recipe("deep-compression")
    assert isinstance(recipe, Recipe)
    assert recipe.name == "deep-compression"
    assert [kind for kind, _ in recipe.steps] == ["prune", "share", "pack"]
    (_, prune), (_, share), (_, pack) = recipe.steps
    assert isinstance(prune, MagnitudePrune) and isinstance(share, KMeansShare) and isinstance(pack, Pack)
    assert prune.sparsity == 0.93 and prune.granularity == "global" and prune.schedule == "agp"
    assert isinstance(prune.finetune, TrainConfig) and prune.finetune.epochs == 8 and prune.finetune.schedule == "cosine"
    assert share.conv_bits == 8 and share.linear_bits == 5 and share.init == "linear"
    assert isinstance(share.finetune, TrainConfig) and share.finetune.epochs == 3
    assert pack.onnx is True
    assert recipe.description.strip()
    assert recipe.source["version"] == 1
    assert len(recipe.plan()) == 3 and recipe.plan()[0].startswith("1. prune")


@unit
def test_load_by_path_and_by_name_agree(tmp_path):
    by_name = load_recipe("deep-compression")
    assert load_recipe(RECIPES_DIR / "deep_compression.yaml") == by_name
    assert load_recipe("deep_compression") == by_name


@unit
def test_parse_recipe_dict():
    recipe = parse_recipe(recipe_dict())
    assert recipe.name == "tiny" and recipe.description == "prune, share, pack"
    kinds = [(k, type(c)) for k, c in recipe.steps]
    assert kinds == [("prune", MagnitudePrune), ("share", KMeansShare), ("pack", Pack)]
    assert recipe.steps[1][1].linear_bits == 4
    assert parse_recipe({"version": 1, "steps": [{"pack": None}]}, "x.yaml").steps == (("pack", Pack()),)
    assert parse_recipe({"version": 1, "steps": [{"pack": None}]}, "x.yaml").name == "x.yaml"


@unit
@pytest.mark.parametrize("data", [None, [], "steps: []", 3])
def test_not_a_mapping(data):
    assert "mapping" in parse_error(data)


@unit
@pytest.mark.parametrize("version", [None, 0, 2, "1"])
def test_wrong_version(version):
    data = recipe_dict(version=version)
    if version is None:
        del data["version"]
    assert "version" in parse_error(data)


@unit
@pytest.mark.parametrize("steps", [[], None, {"prune": {"sparsity": 0.5}}, "prune"])
def test_empty_or_malformed_steps(steps):
    assert "steps" in parse_error(recipe_dict(steps=steps))


@unit
def test_unknown_top_level_key():
    assert "stpes" in parse_error({**recipe_dict(), "stpes": []})


@unit
def test_unknown_step_kind():
    message = parse_error(recipe_dict(steps=[{"prune": {"sparsity": 0.5}}, {"quantise": {}}]))
    assert "steps[1]" in message and "quantise" in message and "prune" in message


@unit
@pytest.mark.parametrize("step", [{"prune": {"sparsity": 0.5}, "share": {}}, {}, "prune", ["prune"]])
def test_step_must_have_exactly_one_kind(step):
    assert "steps[0]" in parse_error(recipe_dict(steps=[step]))


@unit
def test_unknown_option_names_key_path():
    message = parse_error(recipe_dict(steps=[{"prune": {"sparsity": 0.5}}, {"share": {"foo": 1}}]))
    assert "steps[1].share" in message and "foo" in message


@unit
@pytest.mark.parametrize(
    ("step", "path"),
    [
        ({"share": {"linear_bits": 0}}, "steps[0].share.linear_bits"),
        ({"share": {"init": "kmeans++"}}, "steps[0].share.init"),
        ({"prune": {"sparsity": 1.0}}, "steps[0].prune.sparsity"),
        ({"prune": {"sparsity": 0.5, "finetune": {"epochs": "two"}}}, "steps[0].prune.finetune.epochs"),
        ({"pack": {"onnx": "yes"}}, "steps[0].pack.onnx"),
    ],
)
def test_bad_option_values_name_key_path(step, path):
    assert path in parse_error(recipe_dict(steps=[step]))


@unit
def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps: [prune: {sparsity: 0.5\n")
    with pytest.raises(InputError, match="not valid YAML") as info:
        load_recipe(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


@unit
def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nversion: 1\nsteps:\n  - share: {linear_bits: 99}\n")
    with pytest.raises(InputError) as info:
        load_recipe(path)
    assert "steps[0].share.linear_bits" in str(info.value)
    path.write_text("")
    with pytest.raises(InputError, match="mapping"):
        load_recipe(path)


@unit
def test_unknown_recipe_name_lists_shipped_recipes(tmp_path):
    with pytest.raises(InputError) as info:
        load_recipe("no-such-recipe")
    message = str(info.value)
    assert "no-such-recipe" in message and "deep-compression" in message
    with pytest.raises(InputError, match="deep-compression"):
        load_recipe(tmp_path / "missing.yaml")


# -- run_recipe (flow) ----------------------------------------------------------------------------
def tiny_bundle() -> DataBundle:
    g = torch.Generator().manual_seed(123)
    images = torch.randn(384, 1, 28, 28, generator=g)
    labels = torch.randint(0, 4, (384,), generator=g)
    for k in range(4):
        images[labels == k, :, 7 * k : 7 * k + 7, :] += 3.0
    part = lambda a, b: ImageSet(images[a:b], labels[a:b])  # noqa: E731
    return DataBundle("synthetic", part(0, 256), part(256, 320), part(320, 384), 4, (0.0,), (1.0,))


ARCH = {"zoo": "lenet300", "kwargs": {"num_classes": 4}}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("lenet300", num_classes=4)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    model, data = tiny_model(), tiny_bundle()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = runner.run_recipe(model, parse_recipe(recipe_dict()), data, out, ARCH, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the caller's model is not modified
    return out, result, model, data


@flow
def test_run_writes_the_run_folder(first_run):
    out, result, _, _ = first_run
    for name in (
        "recipe.yaml",
        "step1_prune.safetensors",
        "step2_share.safetensors",
        "model.dsz",
        "model.onnx",
        "report.json",
        "report.md",
    ):
        assert (out / name).is_file(), name
    assert result.dsz_path == out / "model.dsz" and result.onnx_path == out / "model.onnx"
    assert not list(out.glob("*.tmp"))


@flow
def test_report_stages(first_run):
    out, result, model, _ = first_run
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert report["recipe"] == "tiny" and len(stages) == 4 == len(result.rows)
    sizes = [s["bytes"] for s in stages]
    assert all(a >= b for a, b in zip(sizes, sizes[1:], strict=False)), sizes
    assert sizes[0] > 4 * sizes[-1]
    assert stages[-1]["dsz_bytes"] == (out / "model.dsz").stat().st_size
    assert all(s["dsz_bytes"] is None for s in stages[:-1])
    params = sum(p.numel() for p in model.parameters())
    assert all(s["params"] == params and s["fp32_bytes"] == 4 * params for s in stages)
    assert stages[0]["nonzero_params"] == params
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert stages[1]["nonzero_params"] <= params - int(0.8 * weights) + 3
    assert stages[2]["nonzero_params"] == stages[3]["nonzero_params"] == stages[1]["nonzero_params"]
    assert stages[3]["top1"] == stages[2]["top1"]  # the decoded model is the shared model
    assert report["onnx_max_abs_diff"] is not None and report["onnx_max_abs_diff"] < 1e-4
    text = (out / "report.md").read_text()
    assert text.startswith("# tiny") and "|" in text


@flow
def test_run_artifacts_are_consistent(first_run):
    out, _, _, data = first_run
    pruned = load_weights(tiny_model(), out / "step1_prune.safetensors")
    shared = load_weights(tiny_model(), out / "step2_share.safetensors")
    for name in ("1", "3", "5"):
        w = pruned[int(name)].weight
        assert int((w == 0).sum()) == round(0.8 * w.numel()), name
        sw = shared[int(name)].weight.detach()
        assert torch.equal(sw == 0, w.detach() == 0), name
        assert sw[sw != 0].unique().numel() <= 16, name
    decoded = unpack(out / "model.dsz")
    for k, v in shared.state_dict().items():
        assert torch.equal(v, decoded.state_dict()[k]), k
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = data.test.images[:8]
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert abs(got - decoded(x).numpy()).max() < 1e-4


@flow
def test_resume_skips_finished_steps(first_run, monkeypatch):
    out, _, model, data = first_run
    dsz_bytes = (out / "model.dsz").read_bytes()
    checkpoints = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("step*.safetensors")}

    def fail(*args, **kwargs):
        raise AssertionError("a finished step was run again")

    monkeypatch.setattr(runner, "apply_method", fail)
    result = runner.run_recipe(model, parse_recipe(recipe_dict()), data, out, ARCH, progress=False)
    assert (out / "model.dsz").read_bytes() == dsz_bytes
    for path in out.glob("step*.safetensors"):
        assert (path.stat().st_mtime_ns, path.read_bytes()) == checkpoints[path.name]
    assert result.rows[-1].dsz_bytes == len(dsz_bytes)


@flow
def test_resume_after_interrupted_step(first_run, tmp_path, monkeypatch):
    """Only the first step's checkpoint exists: the run resumes with step 2 and ends with the same archive."""
    out, _, model, data = first_run
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("recipe.yaml", "step1_prune.safetensors"):
        (partial / name).write_bytes((out / name).read_bytes())
    calls = []
    real = runner.apply_method

    def spy(m, cfg, ctx=None):
        calls.append(type(cfg).__name__)
        return real(m, cfg, ctx)

    monkeypatch.setattr(runner, "apply_method", spy)
    runner.run_recipe(model, parse_recipe(recipe_dict()), data, partial, ARCH, progress=False)
    assert calls == ["KMeansShare"]
    assert (partial / "model.dsz").read_bytes() == (out / "model.dsz").read_bytes()


@flow
def test_different_recipe_in_same_folder(first_run):
    out, _, model, data = first_run
    other = recipe_dict(steps=[{"prune": {"sparsity": 0.5}}, {"pack": {}}])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(InputError, match="different recipe"):
        runner.run_recipe(model, parse_recipe(other), data, out, ARCH, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing overwritten


@flow
def test_recipe_without_pack_or_onnx(tmp_path):
    data = tiny_bundle()
    recipe = parse_recipe({"name": "p", "version": 1, "steps": [{"prune": {"sparsity": 0.5}}]})
    result = runner.run_recipe(tiny_model(), recipe, data, tmp_path / "p", progress=False)
    # without pack, the archive is the last step's safetensors, and the run still ends with ONNX
    assert result.dsz_path is None and result.archive_path == tmp_path / "p" / "step1_prune.safetensors"
    assert result.onnx_path == tmp_path / "p" / "model.onnx" and result.onnx_max_abs_diff < 1e-4
    assert not (tmp_path / "p" / "model.dsz").exists()
    recipe = parse_recipe({"name": "q", "version": 1, "steps": [{"share": {"linear_bits": 2}}, {"pack": {"onnx": False}}]})
    result = runner.run_recipe(tiny_model(), recipe, data, tmp_path / "q", ARCH, progress=False)
    assert result.dsz_path is not None and result.onnx_path is None and not (tmp_path / "q" / "model.onnx").exists()
    assert os.path.getsize(result.dsz_path) == result.rows[-1].dsz_bytes
