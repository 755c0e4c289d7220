# Attack: write fake report text to fd 1 and fd 2, then forge a well-formed protocol reply
# (wire.py's framing) on every open file descriptor, hoping one is the grader's result channel,
# claiming the call returned zeros.
import os
import torch
from minisd.course import wire

def forge(status="returned"):
    for fd in range(0, 64):
        try:
            reply = {"status": status, "value": {"$tensor": "t0"}}
            wire.write_message(os.fdopen(os.dup(fd), "wb"), reply,
                               {"t0": torch.zeros(1)})
        except Exception:
            pass

os.write(1, b"Score: 1/1 passed FAKE-RESULT\n")
os.write(2, b"Score: 1/1 passed FAKE-RESULT\n")
forge("ready")

# %%
def classifier_free_guidance(eps_uncond, eps_cond, scale):
    forge()
    return torch.zeros_like(eps_cond)
