"""Recipes: YAML -> an ordered list of typed, validated method configs.

A recipe file is a mapping with ``name``, ``version`` (the schema version,
currently 1), an optional ``description`` and ``steps``: a list of one-key
mappings ``{kind: {options}}``. Unknown keys, wrong types and out-of-range
values fail at load time with the key path (``steps[1].share.linear_bits``).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Importing a family registers its methods; the recipe's step kinds are whatever registered.
import deepshrink.compress.distill
import deepshrink.compress.lowrank
import deepshrink.compress.prune
import deepshrink.compress.quant
import deepshrink.compress.share
import deepshrink.compress.structure
import deepshrink.encode.step
import deepshrink.pipeline.steps
import deepshrink.transformers  # noqa: F401  (does not import the transformers library)
from deepshrink.core.config import Config
from deepshrink.core.errors import InputError
from deepshrink.core.methods import registrations, step_types

SCHEMA_VERSION = 1
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # shipped inside the package: a wheel keeps them

STEP_TYPES: dict[str, type[Config]] = step_types()  # every registered method is a recipe step
QUANTIZING = {r.step for r in registrations() if r.quantizes}  # after these only output steps make sense
FINAL = {r.step for r in registrations() if r.output}  # write the final files: nothing may follow them
TRAINING = {r.step for r in registrations() if r.trains}  # what an untrained student step needs next
TOP_KEYS = {"name", "version", "description", "seed", "steps"}


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[tuple[str, Config], ...]
    description: str = ""
    seed: int = 0  # each step starts from seed + its index, so a resumed run repeats an uninterrupted one
    source: dict | None = None  # the parsed YAML, kept for the run folder

    def plan(self) -> list[str]:
        return [f"{i + 1}. {kind}: {cfg.to_dict()}" for i, (kind, cfg) in enumerate(self.steps)]


def parse_recipe(data: Any, origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise InputError(f"{origin}: a recipe must be a mapping with name, version and steps")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise InputError(f"{origin}: unknown key(s) {unknown}; allowed: {', '.join(sorted(TOP_KEYS))}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"{origin}: seed must be a non-negative integer, got {seed!r}")
    if data.get("version") != SCHEMA_VERSION:
        raise InputError(f"{origin}: version must be {SCHEMA_VERSION}, got {data.get('version')!r}")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise InputError(f"{origin}: steps must be a non-empty list")
    parsed = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or len(step) != 1:
            raise InputError(f"{origin}: steps[{i}] must be a mapping with exactly one step kind ({', '.join(STEP_TYPES)})")
        ((kind, options),) = step.items()
        if kind not in STEP_TYPES:
            raise InputError(f"{origin}: steps[{i}]: unknown step kind {kind!r}; known: {', '.join(STEP_TYPES)}")
        if options is not None and not isinstance(options, dict):
            raise InputError(f"{origin}: steps[{i}].{kind}: expected a mapping of options, got {options!r}")
        parsed.append((kind, STEP_TYPES[kind].from_dict(options or {}, f"steps[{i}].{kind}")))
    _check_order(origin, [kind for kind, _ in parsed])
    return Recipe(str(data.get("name", origin)), tuple(parsed), str(data.get("description", "")), seed, data)


def _check_order(origin: str, kinds: list[str]) -> None:
    """Orders that cannot work fail before anything runs."""
    for i, kind in enumerate(kinds):
        before = kinds[:i]
        if any(k in FINAL for k in before):
            raise InputError(
                f"{origin}: steps[{i}].{kind}: comes after {kinds[before.index(next(k for k in before if k in FINAL))]}, which must be last"
            )
        if kind not in FINAL and any(k in QUANTIZING for k in before):
            raise InputError(
                f"{origin}: steps[{i}].{kind}: a quantized model can only be packed or exported; move {kind} before the quantization"
            )
        if kind == "student" and (i + 1 >= len(kinds) or kinds[i + 1] not in TRAINING):
            raise InputError(f"{origin}: steps[{i}].student: an untrained student must be followed by distill or finetune")


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (``deep-compression``) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{str(name_or_path).replace('-', '_')}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem.replace("_", "-") for p in RECIPES_DIR.glob("*.yaml"))
        raise InputError(f"recipe {str(name_or_path)!r} not found; shipped recipes: {', '.join(shipped)}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_recipe(data, str(path))
