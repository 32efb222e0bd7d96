"""orthoptim: orthogonal optimizers for PyTorch.

* :class:`FOGO`: orthogonalized dual-stream momentum with a memory of protected subspaces.
* :class:`KFAC`, :class:`FOP`: K-FAC natural gradient and its Fisher-orthogonal projection.
* :func:`param_groups`: Muon-style routing of a model's parameters (hidden matrices vs the rest).
"""

__version__ = "0.1.0"

from orthoptim.optim.fogo import FOGO
from orthoptim.optim.fogo_reference import FOGOReference
from orthoptim.optim.fop import FOP
from orthoptim.optim.kfac import KFAC
from orthoptim.optim.param_groups import param_groups

__all__ = ["FOGO", "FOGOReference", "FOP", "KFAC", "param_groups"]
