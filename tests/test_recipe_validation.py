"""Malformed recipes through `deepshrink compress`: each is one clear error line naming
the offending key, exit code 2, and no run folder left behind."""

import pytest
import yaml

from deepshrink import cli

flow = pytest.mark.flow

FINETUNE = {"epochs": 1, "lr": 0.01}


def recipe(*steps, **top) -> dict:
    return {"name": "bad", "version": 1, "steps": list(steps), **top}


# (id, recipe mapping or raw YAML text, text the error must contain)
MALFORMED = [
    ("unknown step kind", recipe({"prunee": {"sparsity": 0.5}}), "unknown step kind 'prunee'"),
    ("negative sparsity", recipe({"prune": {"sparsity": -0.1}}), "steps[0].prune.sparsity"),
    ("sparsity above 1", recipe({"prune": {"sparsity": 1.5}}), "steps[0].prune.sparsity"),
    ("sparsity not a number", recipe({"prune": {"sparsity": "high"}}), "steps[0].prune.sparsity"),
    ("misspelt option", recipe({"prune": {"sparsty": 0.5}}), "steps[0].prune: unknown key(s) ['sparsty']"),
    (
        "misspelt nested option",
        recipe({"prune": {"sparsity": 0.5, "finetune": {"epoch": 3}}}),
        "steps[0].prune.finetune: unknown key(s) ['epoch']",
    ),
    ("negative epochs", recipe({"finetune": {"train": {"epochs": -1}}}), "steps[0].finetune.train"),
    ("zero learning rate", recipe({"finetune": {"train": {"lr": 0}}}), "steps[0].finetune.train"),
    ("1-bit PTQ weights", recipe({"quantize": {"weight_bits": 1}}), "steps[0].quantize.weight_bits"),
    ("9-bit activations", recipe({"quantize": {"activation_bits": 9}}), "steps[0].quantize.activation_bits"),
    ("unknown QAT quantizer", recipe({"qat": {"weight_quantizer": "foo"}}), "steps[0].qat.weight_quantizer"),
    ("0-bit codebook", recipe({"share": {"conv_bits": 0}}), "steps[0].share"),
    ("unknown decomposition", recipe({"decompose": {"method": "qr", "energy": 0.9}}), "steps[0].decompose.method"),
    ("two rank rules", recipe({"decompose": {"rank": 4, "energy": 0.9}}), "steps[0].decompose"),
    ("channel ratio 1", recipe({"channel_prune": {"ratio": 1.0}}), "steps[0].channel_prune"),
    ("bad scope regex", recipe({"prune": {"sparsity": 0.5, "scope": {"include": "("}}}), "steps[0].prune.scope.include"),
    ("unknown layer type", recipe({"prune": {"sparsity": 0.5, "scope": {"types": ["Conv3d"]}}}), "steps[0].prune.scope.types"),
    ("missing version", {"name": "bad", "steps": [{"pack": {}}]}, "version must be 1"),
    ("future version", recipe({"pack": {}}, version=2), "version must be 1"),
    ("no steps", recipe(), "steps must be a non-empty list"),
    ("steps not a list", {"name": "bad", "version": 1, "steps": {"prune": {}}}, "steps must be a non-empty list"),
    ("misspelt top-level key", {"name": "bad", "version": 1, "stpes": []}, "unknown key(s) ['stpes']"),
    ("negative seed", recipe({"pack": {}}, seed=-3), "seed must be a non-negative integer"),
    ("two kinds in one step", recipe({"prune": {"sparsity": 0.5}, "share": {}}), "steps[0] must be a mapping with exactly one step kind"),
    ("options not a mapping", recipe({"prune": [0.5]}), "steps[0].prune: expected a mapping"),
    (
        "prune after quantize",
        recipe({"quantize": {}}, {"prune": {"sparsity": 0.5}}),
        "steps[1].prune: a quantized model can only be packed",
    ),
    ("step after pack", recipe({"pack": {}}, {"prune": {"sparsity": 0.5}}), "steps[1].prune: comes after pack"),
    ("untrained student", recipe({"student": {"model": "lenet_small"}}, {"export": {}}), "steps[0].student: an untrained student"),
    ("unknown student", recipe({"student": {"model": "resnet99"}}, {"distill": {"train": FINETUNE}}), "steps[0].student"),
    ("teacher file missing", recipe({"distill": {"teacher": "no_such_module:build", "train": FINETUNE}}), "steps[0].distill"),
    ("not YAML", "name: bad\nversion: 1\nsteps: [prune: {sparsity: 0.5\n", "not valid YAML"),
    ("not a mapping", "- prune: {sparsity: 0.5}\n", "a recipe must be a mapping"),
]


@flow
@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_recipe_is_one_clear_error(case, tmp_path, capsys):
    _, content, expected = case
    path = tmp_path / "bad.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    out = tmp_path / "run"
    code = cli.main(["compress", "lenet5", "--recipe", str(path), "--out", str(out), "--test-subset", "200", "--train-subset", "200"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("deepshrink: error: ") and expected in err, err
    assert not out.exists()


@flow
def test_missing_recipe_file_lists_shipped_recipes(tmp_path, capsys):
    code = cli.main(["compress", "lenet5", "--recipe", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not found" in err and "deep-compression" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
