# Attack: walk up the call stack to the check's local `expected` (or any tensor of the right shape
# that is not an argument) and return it.
import sys
import torch

# %%
def classifier_free_guidance(eps_uncond, eps_cond, scale):
    frame = sys._getframe(1)
    while frame is not None:
        for name in ("expected", "guided", "reference"):
            value = frame.f_locals.get(name)
            if isinstance(value, torch.Tensor) and value.shape == eps_cond.shape:
                return value.clone()
        for value in frame.f_locals.values():
            if callable(value) and getattr(value, "__name__", "") == "guided":
                return value(eps_uncond, eps_cond, scale)
        frame = frame.f_back
    return torch.zeros_like(eps_cond)
