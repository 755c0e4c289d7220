# Attack: claim (in the notebook's metadata, set by the test) to be chapter 00, whose task is easy
# to copy, and implement only that one.
import torch

# %%
def predict_x0(x_t, eps, alpha_bar):
    alpha_bar = torch.as_tensor(alpha_bar, dtype=x_t.dtype)
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
