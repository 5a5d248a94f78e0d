"""Corrections fitted after quantization, without backpropagation unless asked: the ``correct/`` stage.

``capture`` (run a model up to a layer) -> ``reparam`` (LayerNorm scales folded before calibration) ->
``reconstruct`` (optional block-wise Adam) -> ``fit`` (closed-form corrections) -> ``fold`` (into weights,
biases, LayerNorm affines) -> ``measure`` (per-block errors against the float model).
"""

from dfq_deploy.quant.correct.capture import block_inputs, check_separate, eval_mode, num_prefix_tokens
from dfq_deploy.quant.correct.fit import DEFAULT_ALPHAS, MAX_TOKENS, MODES, PREFIX_SHARE, fit_corrections_
from dfq_deploy.quant.correct.fold import LinearCorrection, attach_correction_, fold_corrections_, fold_linear_
from dfq_deploy.quant.correct.measure import block_errors, plot_block_errors
from dfq_deploy.quant.correct.reconstruct import reconstruct_
from dfq_deploy.quant.correct.reparam import reparam_layernorm_

__all__ = [
    "DEFAULT_ALPHAS", "MAX_TOKENS", "MODES", "PREFIX_SHARE", "LinearCorrection", "attach_correction_",
    "block_errors", "block_inputs", "check_separate", "eval_mode", "fit_corrections_", "fold_corrections_",
    "fold_linear_", "num_prefix_tokens", "plot_block_errors", "reconstruct_", "reparam_layernorm_",
]
