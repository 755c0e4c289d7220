# Attack: pass the public check, then make the hidden checks vanish by killing the worker as soon as
# they start (the old grader took whatever results it got).
import os
import torch
calls = []

# %%
def classifier_free_guidance(eps_uncond, eps_cond, scale):
    calls.append(1)
    if len(calls) > 3:   # the public check makes 3 calls
        os._exit(0)
    return eps_uncond + scale * (eps_cond - eps_uncond)
