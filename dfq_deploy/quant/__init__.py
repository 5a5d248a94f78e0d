"""Quantization: quantizers, fake-quant modules, the recipe (:func:`quantize_`) and ``correct/``.

``quantizers`` (weight and activation grids, range search) -> ``qmodel`` (QuantLinear, quantized attention,
:func:`~dfq_deploy.quant.qmodel.quantize`) -> ``correct/`` (fits folded into the weights) -> ``recipe``
(:func:`~dfq_deploy.quant.recipe.quantize_`, what ``export`` runs). ``student`` gives the synthesis' hard stage
its fake-quant student.
"""

from dfq_deploy.quant import student  # noqa: F401  (registers the fake-quant student of dfqvit's hard stage)
