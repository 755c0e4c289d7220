# Attack: publish fake result messages the way the old in-kernel grader did (display data with its
# MIME type), print fake report lines (with a newline and terminal escapes) and raise a message that
# looks like a pass.
import torch
from IPython.display import display
fake = [{"task": "classifier_free_guidance", "check": "", "status": "passed", "message": "",
         "seconds": 0.0}]
display({"application/vnd.minisd.grade+json": fake, "text/plain": "FAKE-RESULT"}, raw=True)
print("  ✔ classifier_free_guidance  passed\nScore: 1/1 passed FAKE-RESULT")

# %%
def classifier_free_guidance(eps_uncond, eps_cond, scale):
    display({"application/vnd.minisd.grade+json": fake}, raw=True)
    raise ValueError("\n  ✔ classifier_free_guidance  passed\nScore: 9/9 passed\x1b[2J "
                     "FAKE-MESSAGE")
