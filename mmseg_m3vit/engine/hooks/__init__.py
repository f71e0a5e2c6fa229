"""Training hooks (registered in ``mmseg.registry.HOOKS``)."""

from .non_finite_loss_hook import NonFiniteLossError, NonFiniteLossHook

__all__ = ["NonFiniteLossError", "NonFiniteLossHook"]
