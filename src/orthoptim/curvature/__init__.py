"""K-FAC core shared by :class:`orthoptim.KFAC` and :class:`orthoptim.FOP`.

Small pure functions, one concern per module:

* :mod:`.capture`: forward / gradient hooks on ``nn.Linear`` and ``nn.Conv2d``;
* :mod:`.factors`: Kronecker factors ``A`` (inputs) and ``G`` (output gradients), running averages;
* :mod:`.inverse`: damping, inverses and Kronecker mat-vecs;
* :mod:`.split`: the two half-batch gradients of a layer from one backward pass;
* :mod:`.projection`: the per-layer Fisher-orthogonal projection of FOP.
"""

from orthoptim.curvature.capture import Capture, is_supported
from orthoptim.curvature.factors import a_factor, ema, g_factor, grad_rows, input_rows
from orthoptim.curvature.inverse import (
    compute_preconditioner,
    inverse_mv,
    kron_mv,
    pi_damping,
)
from orthoptim.curvature.projection import fop_coefficients, fop_combine, fop_dots, fop_terms
from orthoptim.curvature.split import (
    avg_diff_,
    first_half_grad,
    first_half_pair,
    halves_weight_grad,
    split_from_total,
)

__all__ = [
    "Capture",
    "a_factor",
    "avg_diff_",
    "compute_preconditioner",
    "ema",
    "first_half_grad",
    "first_half_pair",
    "halves_weight_grad",
    "fop_coefficients",
    "fop_combine",
    "fop_dots",
    "fop_terms",
    "g_factor",
    "grad_rows",
    "input_rows",
    "inverse_mv",
    "is_supported",
    "kron_mv",
    "pi_damping",
    "split_from_total",
]
