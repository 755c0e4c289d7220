# Attack (chapter 01): let PyTorch's fused kernel or minisd's own attention do the task, bound in
# ways that dodge a simple name check.
import torch
from torch.nn.functional import scaled_dot_product_attention as fused

# %%
def scaled_dot_product_attention(q, k, v, mask=None):
    return fused(q, k, v, attn_mask=mask)
