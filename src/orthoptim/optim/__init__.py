"""Optimizer classes: thin ``torch.optim.Optimizer`` shells over ``orthoptim.ops``."""
