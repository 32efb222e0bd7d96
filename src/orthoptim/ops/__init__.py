"""Pure tensor math shared by the optimizers. Nothing here holds state or imports ``optim``."""

from orthoptim.ops.newton_schulz import MUON_COEFFICIENTS, NS_PRESETS, newton_schulz

__all__ = ["MUON_COEFFICIENTS", "NS_PRESETS", "newton_schulz"]
