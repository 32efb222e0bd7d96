"""K-FAC core shared by :class:`orthoptim.KFAC` and :class:`orthoptim.FOP`.

Small pure functions, one concern per module:

* :mod:`.adapters`: how each layer kind is seen (blocks, input / output-gradient rows, weight
  layout); the extension point (:func:`register_adapter`);
* :mod:`.discovery`: which parameters of a model are preconditioned, and why the others are not;
* :mod:`.capture`: the hooks that record inputs, output gradients and FOP's sub-batch gradients;
* :mod:`.owners`: finding the model of a parameter list; compiled models;
* :mod:`.factors`: Kronecker factors ``A`` (inputs) and ``G`` (output gradients), running averages;
* :mod:`.inverse`: damping, inverses and Kronecker mat-vecs;
* :mod:`.split`: the two sub-batch gradients of a block from the training backward;
* :mod:`.projection`: the per-layer Fisher-orthogonal projection of FOP.
"""

from orthoptim.curvature.adapters import Block, LayerAdapter, LayerOps, register_adapter
from orthoptim.curvature.capture import Capture
from orthoptim.curvature.discovery import find_blocks
from orthoptim.curvature.factors import a_factor, a_sum, ema, g_factor, g_sum
from orthoptim.curvature.inverse import (
    compute_preconditioner,
    inverse_mv,
    kron_mv,
    pi_damping,
)
from orthoptim.curvature.projection import fop_coefficients, fop_combine, fop_dots, fop_terms
from orthoptim.curvature.split import avg_diff_, halves, split_from_total

__all__ = [
    "Block",
    "Capture",
    "LayerAdapter",
    "LayerOps",
    "a_factor",
    "a_sum",
    "avg_diff_",
    "compute_preconditioner",
    "ema",
    "find_blocks",
    "fop_coefficients",
    "fop_combine",
    "fop_dots",
    "fop_terms",
    "g_factor",
    "g_sum",
    "halves",
    "inverse_mv",
    "kron_mv",
    "pi_damping",
    "register_adapter",
    "split_from_total",
]
