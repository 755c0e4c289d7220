# Attack: hang the grader: a cell that never ends and swallows every interrupt, and a function that
# does the same.
import time
import torch

# %%
while True:
    try:
        time.sleep(100)
    except BaseException:
        pass

# %%
def classifier_free_guidance(eps_uncond, eps_cond, scale):
    while True:
        try:
            time.sleep(100)
        except BaseException:
            pass
