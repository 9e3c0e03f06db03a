"""Analysis above the compression methods: how a model responds to them (sensitivity
scans). Pure metrics live in ``deepshrink.evaluate``, below ``compress``."""

from deepshrink.analysis.sensitivity import SensitivityResult, layer_sensitivity, layer_sparsities_for_target, plot_sensitivity

__all__ = ["SensitivityResult", "layer_sensitivity", "layer_sparsities_for_target", "plot_sensitivity"]
