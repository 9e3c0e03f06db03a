"""One accuracy-aware search: trials along the plan path, each continuing from the last good pruned model,
each re-weighting the pruning and sharing costs by the damage it measured after fine-tuning."""

import copy
import math
import tempfile
import time
from pathlib import Path

from rich.console import Console
from torch import nn

from deepshrink.analysis.sensitivity import kl_divergence, output_logprobs
from deepshrink.data.datasets import DataBundle, ImageSet
from deepshrink.encode.pack import pack
from deepshrink.evaluate.accuracy import evaluate_accuracy
from deepshrink.pipeline.auto.costs import interpolated_cost, layer_names, layer_options, measure_bytes, measure_sensitivity, sharing_cost
from deepshrink.pipeline.auto.options import AutoOptions, AutoResult, Plan, Trial
from deepshrink.pipeline.auto.plan import plan_bytes, plan_dict, plan_path, plan_summary, planned_sparsity, sparsities
from deepshrink.pipeline.auto.stages import Teacher, prune_stage, share_stage


class Search:
    """One accuracy-aware search: trials along the plan path, each continuing from the last good pruned model,
    each re-weighting the pruning and sharing costs by the damage it measured after fine-tuning."""

    def __init__(
        self,
        model: nn.Module,
        data: DataBundle,
        gate: ImageSet,
        result: "AutoResult",
        architecture,
        options: AutoOptions,
        teacher: Teacher | None,
        progress: bool,
    ):
        self.model, self.data, self.gate, self.architecture, self.teacher = model, data, gate, architecture, teacher
        self.baseline, self.floor = result.baseline_gate_top1, result.baseline_gate_top1 - result.max_drop
        self.options, self.progress = options, progress
        self.names = layer_names(model, options.scope)
        self.params = {n: m.weight.numel() for n, m in options.scope.layers(model)}
        self.images = data.val.subset(options.sensitivity_samples).images
        self.console = Console(quiet=not progress)
        self.trials: list[Trial] = []
        self.pruned: dict[int, nn.Module] = {}  # trial number -> its pruned (unshared) model
        self.shared: dict[int, nn.Module] = {}  # trial number -> its final model
        self.base_label = f"trial {result.trials[-1].number}" if result.trials else "original"  # after a channel stage
        self.weights = (1.0, 1.0)  # scale of the (pruning, sharing) costs
        self.sensitivity: dict = {}
        self.plans: list[Plan] = []
        self.fixed = 0

    # preparation
    def measure_bytes(self) -> None:
        self.table, self.fixed = measure_bytes(self.model, self.names, self.options, self.progress)

    def build_path(self) -> None:
        self.sensitivity = measure_sensitivity(self.model, self.images, self.names, self.options, self.progress)
        self.reference = output_logprobs(self.model, self.images)
        self._rebuild()
        self.console.print(
            f"plan path: {len(self.plans)} plans, estimated {self.est(self.plans[0]):,} -> {self.est(self.plans[-1]):,} bytes "
            f"({self.fixed:,} of them biases, BN and archive overhead)"
        )

    def _rebuild(self) -> None:
        self.plans = plan_path(layer_options(self.sensitivity, self.table, self.weights))

    def est(self, plan: Plan) -> int:
        return plan_bytes(plan, self.fixed)

    def plan_within(self, budget: float) -> Plan:
        """The least aggressive plan estimated to fit ``budget`` (the most aggressive if none does)."""
        return next((p for p in self.plans if self.est(p) <= budget), self.plans[-1])

    # trials
    def start_for(self, plan: Plan, continue_same: bool) -> tuple[str, nn.Module]:
        """Where a trial fine-tunes from: with ``continue_same``, a trial with the same sparsities (a longer
        fine-tune of it); else the latest pruned model within the drop that is no sparser than the plan;
        else the original."""
        planned = planned_sparsity(plan, self.params)
        for t in reversed([t for t in self.trials if t.number in self.pruned]):
            if continue_same and sparsities(t.plan) == sparsities(plan_dict(plan)):
                return f"trial {t.number}, fine-tuned longer", self.pruned[t.number]
            if t.gate_top1_pruned >= self.floor and t.planned_sparsity <= planned + 0.02:
                return f"trial {t.number}", self.pruned[t.number]
        return self.base_label, self.model

    def run_trial(self, plan: Plan, budget: float, start: tuple[str, nn.Module]) -> Trial:
        began = time.perf_counter()
        label, source = start
        trial = Trial(len(self.trials) + 1, "prune+share", label, int(budget), self.est(plan), plan=plan_dict(plan), weights=self.weights)
        trial.planned_sparsity = planned_sparsity(plan, self.params)
        self.console.print(f"trial {trial.number}: estimated {trial.est_bytes:,} bytes, from {label}")
        bits = {n: o.bits for n, o in plan.items()}
        train = self.options.prune_train()
        sparsity = {n: o.sparsity for n, o in plan.items()}
        pruned = prune_stage(copy.deepcopy(source), sparsity, train, self.data, self.options.scope, self.teacher, self.progress)
        self.pruned[trial.number] = pruned
        trial.gate_top1_pruned = evaluate_accuracy(pruned, self.gate).top1
        trial.sparsity, trial.mean_bits = plan_summary(pruned, self.names, bits)
        shared = None
        if trial.gate_top1_pruned < self.floor:  # sharing only loses more: save its fine-tuning
            trial.note = "pruning alone exceeds the drop; sharing skipped"
        else:
            shared = share_stage(pruned, bits, self.options.share_train(), self.data, self.options.scope, self.teacher, self.progress)
            self.shared[trial.number] = shared
            trial.gate_top1 = evaluate_accuracy(shared, self.gate).top1
            with tempfile.TemporaryDirectory() as tmp:
                trial.bytes = pack(shared, Path(tmp) / "trial.dsz", self.architecture).file_bytes  # as the final file
        trial.drop = self.baseline - (trial.gate_top1 if trial.gate_top1 is not None else trial.gate_top1_pruned)
        trial.feasible = trial.gate_top1 is not None and trial.gate_top1 >= self.floor
        self._calibrate(plan, pruned, shared)
        trial.seconds = time.perf_counter() - began
        self.trials.append(trial)
        self._print(trial)
        return trial

    def _calibrate(self, plan: Plan, pruned: nn.Module, shared: nn.Module | None) -> None:
        """Scale each cost by measured / predicted damage (KL after fine-tuning vs the one-layer sum) and rebuild
        the path: the next plan spends less of whichever the trials show is costlier than it looked."""
        pruned_out = output_logprobs(pruned, self.images)
        predicted = sum(interpolated_cost(self.sensitivity[n]["prune"], o.sparsity) for n, o in plan.items() if o.sparsity > 0)
        scale_p = kl_divergence(self.reference, pruned_out) / predicted if predicted > 1e-9 else self.weights[0]
        scale_b = self.weights[1]
        if shared is not None:
            predicted = sum(sharing_cost(self.sensitivity[n], o.sparsity, o.bits) for n, o in plan.items())
            scale_b = kl_divergence(pruned_out, output_logprobs(shared, self.images)) / predicted if predicted > 1e-9 else scale_b
        self.weights = tuple(min(1e3, max(1e-3, w)) for w in (scale_p, scale_b))
        self._rebuild()

    def _print(self, t: Trial) -> None:
        size = f"{t.bytes:,} bytes" if t.bytes is not None else "not packed"
        shared = f"{t.gate_top1:.2f}" if t.gate_top1 is not None else "-"
        self.console.print(
            f"  sparsity {100 * t.sparsity:.1f}%, {t.mean_bits:.2f} bits per non-zero weight, {size}; {self.options.gate} Top-1 "
            f"{t.gate_top1_pruned:.2f} pruned, {shared} shared, drop {t.drop:.2f}: {'ok' if t.feasible else 'too inaccurate'} "
            f"[{t.seconds:.0f}s]; cost weights now prune {self.weights[0]:.3g}, share {self.weights[1]:.3g}"
        )

    # strategies
    def smallest_within_drop(self) -> Trial | None:
        """Bisect the byte budget (geometrically) for the smallest plan within the accuracy bound."""
        low, high, best = self.est(self.plans[-1]), self.est(self.plans[0]), None
        while len(self.trials) < self.options.max_trials:
            last_chance = best is None and len(self.trials) == self.options.max_trials - 1
            plan = self.plans[0] if last_chance else self._plan_between(low, high)  # nothing good yet: the safest plan
            if plan is None:
                break
            start = self.start_for(plan, continue_same=False)  # build on the last good model, not a failed one
            if self._known_to_fail(plan, start[0]):
                low = max(low, self.est(plan))
                continue
            trial = self.run_trial(plan, math.sqrt(low * high), start)
            if trial.feasible:
                best = trial if best is None or trial.bytes < best.bytes else best
                high = min(high, trial.est_bytes)
            else:
                low = max(low, trial.est_bytes)
        return best

    def _plan_between(self, low: float, high: float) -> Plan | None:
        """The plan nearest the geometric middle of (low, high), both ends excluded (None once they meet)."""
        inside = [p for p in self.plans if low < self.est(p) < high]
        middle = math.log(low * high) / 2
        return min(inside, key=lambda p: abs(math.log(self.est(p)) - middle), default=None)

    def _known_to_fail(self, plan: Plan, start: str) -> bool:
        """These sparsities from this start already failed at the pruning stage (training is deterministic)."""
        sparsity = sparsities(plan_dict(plan))
        return any(t.start == start and t.gate_top1_pruned < self.floor and sparsities(t.plan) == sparsity for t in self.trials if t.plan)

    def least_aggressive_within(self, target: int) -> Trial | None:
        """The least aggressive plan estimated to fit ``target``. Too big: correct the estimate by the bytes
        measured and take a smaller plan; too inaccurate: the re-weighted plan for the same budget (the
        same sparsities again are a longer fine-tune, until that gains less than 0.1 point)."""
        correction = 1.0
        while len(self.trials) < self.options.max_trials and not self._stalled():
            plan = self.plan_within(target / correction)
            if self.est(plan) > target / correction:
                break  # the corrected estimate fits nothing
            trial = self.run_trial(plan, target / correction, self.start_for(plan, continue_same=True))
            size = trial.bytes if trial.bytes is not None else trial.est_bytes
            if trial.feasible and size <= target:
                return trial
            if size > target:
                trial.note = _join(trial.note, "over the size target")
                correction *= size / trial.est_bytes
        return None

    def _stalled(self) -> bool:
        """Two inaccurate trials of the same sparsities, the second gaining less than 0.1 point: training more won't do."""
        last = self.trials[-2:]
        if len(last) < 2 or not last[0].plan or last[0].feasible or sparsities(last[0].plan) != sparsities(last[1].plan):
            return False
        return last[1].drop > last[0].drop - 0.1

    def closest(self, target: int | None) -> Trial | None:
        """When nothing met the budget: the finished trial within the size target (if any) with the least drop."""
        done = [t for t in self.trials if t.number in self.shared]
        return min(done, key=lambda t: (target is not None and t.bytes > target, t.drop), default=None)


def _join(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more
