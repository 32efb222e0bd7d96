"""orthoptim: orthogonal optimizers for PyTorch."""

__version__ = "0.1.0"

from orthoptim.optim.fogo import FOGO
from orthoptim.optim.fogo_reference import FOGOReference
from orthoptim.optim.param_groups import param_groups

__all__ = ["FOGO", "FOGOReference", "param_groups"]

from orthoptim.optim.fop import FOP
from orthoptim.optim.kfac import KFAC

__all__ += ["FOP", "KFAC"]
