"""One registration per compression method, read by every backend.

A registration carries what the rest of the package needs to know about a
method: its recipe step name, its config type, its apply function per backend
(``torch`` on an ``nn.Module``; ``onnx`` on a ``ModelProto`` where ONNX-in has
one), how to rebuild the structure the step gives a model when a run resumes
from its checkpoint, and what the step needs from the ``Context``. The recipe
schema, the runner (its resume and its output steps), ONNX-in's dispatch and
the contract test all read this one registry; nothing else lists methods.

    @method("channel_prune", ChannelPrune, needs=("data?",))
    class ChannelPruneMethod:
        def torch(self, model, cfg, ctx): ...           # nn.Module -> nn.Module (gets a copy)
        def restore(self, model, cfg, ctx, saved): ...  # optional: the structure after the step
        def saved(self, model): ...                     # optional: metadata restore needs ({str: str})
        def check(self, cfg, ctx): ...                  # optional: fail before any work (a name to resolve)

An *output* step (``pack``, ``export``) writes the run's final files instead of
changing the model: its ``torch`` returns a ``Written``. A backend that lives in
a higher layer (ONNX-in) attaches itself with ``@backend(Config, "onnx")``, so
imports keep pointing down.
"""

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from deepshrink.core.errors import InputError

NEEDS = ("data", "calib", "teacher", "batches", "out_dir")  # Context fields a step may need; "x?" = optional


@dataclass
class Context:
    """What a method may need besides the model and its config."""

    data: Any = None  # a deepshrink.data.DataBundle (labelled image splits), for fine-tuning and calibration
    progress: bool = True
    calib: Any = None  # an iterable of input batches; overrides data.train for calibration (ONNX-in: NpzInputs)
    teacher: Any = None  # the model before compression: distillation steps without a named teacher use it
    model_name: str | None = None  # the zoo name of the input model, when it has one (``student: auto``)
    batches: Any = None  # a batch source for methods that do not train on labelled images: transformer token batches
    architecture: dict | None = None  # the zoo description an output step records in its archive
    out_dir: Path | None = None  # where an output step writes its files


@dataclass
class Written:
    """What an output step wrote: ``files`` by role ("archive", "onnx"), the model the
    archive decodes to (measured as a stage, labelled ``label``), its size on disk, and
    the checks made on the files (ONNX Runtime against PyTorch, ...)."""

    files: dict[str, Path] = field(default_factory=dict)
    model: nn.Module | None = None
    label: str = ""
    file_bytes: int | None = None
    export: bool = False  # an ONNX file of ``model`` should come with the archive
    checks: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One method's registration; see the module docstring."""

    step: str
    config: type
    torch: Callable[..., Any]
    needs: tuple[str, ...] = ()
    onnx: Callable[..., Any] | None = None  # (ModelProto, cfg, ctx) -> (ModelProto, details dict)
    restore: Callable[..., nn.Module] | None = None  # (model before the step, cfg, ctx, saved) -> the step's structure
    saved: Callable[[nn.Module], dict[str, str] | None] | None = None
    check: Callable[[Any, "Context"], None] | None = None  # validates cfg against the context before a run starts
    output: bool = False  # writes the final files; nothing may follow it
    quantizes: bool = False  # leaves a quantized model: only output steps may follow
    trains: bool = False  # trains the whole model from labels or a teacher (what an untrained student needs next)

    def structure_after(self, model: nn.Module, cfg: Any, ctx: "Context", saved: dict[str, str]) -> nn.Module:
        """A model with the structure this step gives ``model``, ready to load the step's checkpoint.

        Without a ``restore`` the step keeps the structure (or only drops channels,
        which loading with ``resize=True`` rebuilds)."""
        return self.restore(model, cfg, ctx, saved) if self.restore else copy.deepcopy(model)

    def check_context(self, cfg: Any, ctx: "Context") -> None:
        if self.check:
            self.check(cfg, ctx)

    def checkpoint_metadata(self, model: nn.Module) -> dict[str, str] | None:
        return self.saved(model) if self.saved else None

    def required(self) -> list[str]:
        return [need for need in self.needs if not need.endswith("?")]


_BY_CONFIG: dict[type, Method] = {}
_BY_STEP: dict[str, Method] = {}


def method(
    step: str, config: type, needs: tuple[str, ...] = (), output: bool = False, quantizes: bool = False, trains: bool = False
) -> Callable[[type], type]:
    """Class decorator: register the class's ``torch`` (and optional ``onnx``, ``restore``,
    ``saved``) as the method for ``config``, recipe step ``step``."""
    unknown = [n for n in needs if n.rstrip("?") not in NEEDS]
    if unknown:
        raise ValueError(f"{step}: unknown need(s) {unknown}; known: {', '.join(NEEDS)}")

    def add(cls: type) -> type:
        impl = cls()
        record = Method(
            step,
            config,
            impl.torch,
            tuple(needs),
            getattr(impl, "onnx", None),
            getattr(impl, "restore", None),
            getattr(impl, "saved", None),
            getattr(impl, "check", None),
            output,
            quantizes,
            trains,
        )
        if config in _BY_CONFIG or step in _BY_STEP:
            raise ValueError(f"a method is already registered for {config.__name__} or step {step!r}")
        _BY_CONFIG[config] = _BY_STEP[step] = record
        return cls

    return add


def backend(config: type, name: str) -> Callable[[Callable], Callable]:
    """Attach a backend (``"onnx"``) implemented in a higher layer to ``config``'s registration."""

    def add(func: Callable) -> Callable:
        record = registration(config)
        if getattr(record, name) is not None:
            raise ValueError(f"{record.step} already has a {name} backend")
        updated = Method(**{**record.__dict__, name: func})
        _BY_CONFIG[config] = _BY_STEP[record.step] = updated
        return func

    return add


def registration(config: Any) -> Method:
    """The registration for a config (or config type)."""
    config_type = config if isinstance(config, type) else type(config)
    try:
        return _BY_CONFIG[config_type]
    except KeyError:
        raise InputError(f"no method registered for config {config_type.__name__}") from None


def registrations() -> Iterator[Method]:
    """Every registration, in the order the modules registered them."""
    return iter(list(_BY_STEP.values()))


def step_types() -> dict[str, type]:
    """Recipe step name -> config type, for every registration."""
    return {record.step: record.config for record in _BY_STEP.values()}


def check_needs(record: Method, ctx: "Context") -> None:
    missing = [need for need in record.required() if getattr(ctx, need) is None]
    if missing:
        raise InputError(f"{record.step} needs {missing[0]}: pass {missing[0]}= in the Context")


def apply_method(model: nn.Module, config: Any, ctx: Context | None = None) -> nn.Module:
    """Run ``config``'s torch method on a copy of ``model``: the caller's model is never modified."""
    record = registration(config)
    ctx = ctx or Context()
    check_needs(record, ctx)
    return record.torch(copy.deepcopy(model), config, ctx)


def write_output(model: nn.Module, config: Any, ctx: Context) -> Written:
    """Run an output step (``pack``, ``export``) on ``model`` itself: it writes files and changes no weights."""
    record = registration(config)
    if not record.output:
        raise InputError(f"{record.step} is not an output step")
    check_needs(record, ctx)
    return record.torch(model, config, ctx)
