"""Scaled dot-product attention, written out.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V                       (Vaswani et al., 2017, eq. 1)

with Q = x W_q, K = c W_k, V = c W_v. Self-attention takes c = x; cross-attention takes c = the text
embedding, which is how the prompt steers the image. Heads split the channels into `heads` groups of
`head_dim` and attend independently; the outputs are concatenated and projected by W_o.

Dividing by √d keeps the logits' variance near 1 when q and k have unit-variance entries (a dot
product of d such terms has variance d); without it softmax saturates and its gradients vanish.

The readable path below (`math`) is the default. `fused` calls torch's scaled_dot_product_attention,
which computes the same function in one kernel without storing the [tokens × tokens] matrix; tests
check the two agree. The choice belongs to each layer (`set_attention_backend(sd, "fused")` sets the
layers of one model), never to the process: two models in one notebook do not affect each other.

The fast path can also fuse the projections (tools/fastpath.py, `fuse_projections`): W_q, W_k and
W_v become row blocks of one matrix, so x [W_q; W_k; W_v]ᵀ is one matrix product instead of three
(for cross-attention c [W_k; W_v]ᵀ, since q reads x while k and v read c).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from einops import rearrange
from torch import nn

from .checks import check_choice, check_number

BACKENDS = ("math", "fused")


def attention_layers(modules) -> list["Attention"]:
    """Every Attention layer inside `modules` (one module, e.g. a model or a UNet, or a list)."""
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    return [m for module in modules for m in module.modules() if isinstance(m, Attention)]


def set_attention_backend(modules, backend: str = "math", slice_size: Optional[int] = None):
    """Choose how the Attention layers inside `modules` compute softmax(QKᵀ/√d)V: 'math' (readable,
    the default) or 'fused'; `slice_size` (math only): that many (batch·head) rows at a time, to
    save memory on small GPUs. Other models are untouched: the choice is stored on each layer."""
    check_choice("attention backend", backend, BACKENDS)
    if slice_size is not None:
        check_number("attention slice size", slice_size, 1, integer=True)
    for layer in attention_layers(modules):
        layer.backend, layer.slice_size = backend, slice_size


def get_attention_backend(modules) -> str:
    """The backend of the Attention layers inside `modules` ('mixed' if they differ)."""
    backends = {layer.backend for layer in attention_layers(modules)}
    return backends.pop() if len(backends) == 1 else "mixed"


@contextlib.contextmanager
def attention_backend(modules, backend: str = "fused", slice_size: Optional[int] = None):
    """`with attention_backend(sd, "fused"): ...` switches the layers of `modules` for a block."""
    layers = attention_layers(modules)
    previous = [(layer.backend, layer.slice_size) for layer in layers]
    set_attention_backend(layers, backend, slice_size)
    try:
        yield
    finally:
        for layer, (old_backend, old_slice) in zip(layers, previous):
            layer.backend, layer.slice_size = old_backend, old_slice


def causal_mask(n: int, device=None) -> torch.Tensor:
    """Boolean [n, n] mask, True where query i may look at key j (j ≤ i): the text encoder reads
    left to right."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def attention_math(
    q, k, v, mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QKᵀ/√d)V for q [B, h, n, d], k and v [B, h, m, d]; returns (output, attention
    probabilities)."""
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhnm,bhmd->bhnd", probs, v), probs


def sliced_attention(q, k, v, mask, slice_size: int) -> torch.Tensor:
    """attention_math for `slice_size` (batch, head) pairs at a time: the [n × m] score matrix is
    never built for all of them at once. Same numbers, less memory."""
    b, h = q.shape[:2]
    q2, k2, v2 = (rearrange(t, "b h n d -> (b h) 1 n d") for t in (q, k, v))
    out = torch.cat(
        [
            attention_math(q2[i : i + slice_size], k2[i : i + slice_size], v2[i : i + slice_size],
                           mask)[0]
            for i in range(0, b * h, slice_size)
        ]
    )
    return rearrange(out, "(b h) 1 n d -> b h n d", b=b, h=h)


def _refuse_after_loading(layer: "Attention", incompatible_keys) -> None:
    """After load_state_dict (children included; assign=True replaces the parameters)."""
    layer.refuse_if_unlinked()


class Attention(nn.Module):
    """Multi-head attention over tokens [B, n, query_dim], optionally attending to a context [B, m,
    context_dim].

    Used three ways in Stable Diffusion: self-attention and cross-attention in the UNet (no q/k/v
    bias), the text encoder's causal self-attention (with biases), and the VAE's one-head attention
    over 512 channels.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: Optional[int] = None,
        qkv_bias: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.is_cross = context_dim is not None
        context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, query_dim)
        # How this layer computes (set_attention_backend): "math" (readable) or "fused"; slices.
        self.backend, self.slice_size = "math", None
        # Chapters set this to a function(probs [B, heads, n, m]) to look at attention maps (it
        # needs the probabilities, so the math path runs while it is set).
        self.probs_hook: Optional[Callable[[torch.Tensor], None]] = None
        # The fast path's fused projections (fuse_projections below): the rows of [W_q; W_k; W_v]
        # (cross-attention: [W_k; W_v]) in one matrix, whose row blocks *are* to_q/to_k/to_v's
        # weights (views: no copy); None on the readable path. Not persistent, so that the state
        # dict keeps its official names.
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)
        self.register_load_state_dict_post_hook(_refuse_after_loading)

    def plain_projections(self) -> bool:
        """True while to_q, to_k, to_v are plain linear layers (an adapter such as LoRA, wrapped
        around them after fusing, must run: then the fused matrix is not the whole projection)."""
        return all(type(p) is nn.Linear for p in (self.to_q, self.to_k, self.to_v))

    # ------------------------------------------------ the fast path's fused projections
    def _fused_parts(self) -> list[nn.Linear]:
        return [self.to_k, self.to_v] if self.is_cross else [self.to_q, self.to_k, self.to_v]

    def fuse_projections(self) -> None:
        """Concatenate the projections' weights (and biases) into one matrix and make each
        parameter a view of its row block: the same Parameter objects (an optimizer holding them
        still works), the same numbers, no second copy. Built from the parameters, so calling it
        again after they were replaced or converted re-links them."""
        if not self.plain_projections():
            return  # wrapped (LoRA): stays on the readable branch
        parts = self._fused_parts()
        for name in ("weight", "bias"):
            if getattr(parts[0], name) is None:
                continue
            params = [getattr(p, name) for p in parts]
            fused = torch.cat([t.detach() for t in params])
            for param, block in zip(params, fused.split([t.shape[0] for t in params])):
                param.data = block
            setattr(self, f"fused_{name}", fused)

    def unfuse_projections(self) -> None:
        """Undo fuse_projections: each projection gets its own memory again (same objects)."""
        if self.fused_weight is None:
            return
        for p in (self.to_q, self.to_k, self.to_v):
            p = getattr(p, "base", p)  # a LoRA wrapped after fusing holds the linear as .base
            for param in (p.weight, p.bias):
                if param is not None:
                    param.data = param.data.clone()
        self.fused_weight = self.fused_bias = None

    # Module conversions (.to, .half, .cuda), copies (deepcopy, pickling) and
    # load_state_dict(assign=True) give the parameters and the fused matrix separate memory; the
    # fused matrix is then rebuilt from the parameters (here and in _refuse_after_loading), so it
    # never goes stale.
    # Only where a link is broken: re-fusing moves the weights, and a CUDA graph recorded on the
    # fast path reads them at their addresses.
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.refuse_if_unlinked()
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        self.refuse_if_unlinked()

    def refuse_if_unlinked(self) -> None:
        """Rebuild the fused matrix from the parameters if any of them is no longer a view of it."""
        buffers = self.__dict__.get("_buffers", {})  # .get: a layer pickled before fusing existed
        pairs = [("weight", buffers.get("fused_weight")), ("bias", buffers.get("fused_bias"))]
        if pairs[0][1] is None:
            return
        linked = all(
            getattr(p, name).untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
            for name, fused in pairs
            if fused is not None
            for p in self._fused_parts()
        )
        if not linked:
            self.fuse_projections()

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # the fused projections serve inference only: with gradients the readable line runs
        fused = (
            self.fused_weight is not None
            and not torch.is_grad_enabled()
            and self.plain_projections()
        )
        if fused and self.is_cross:  # one product for both projections of the context
            q = self.to_q(x)
            c = x if context is None else context
            k, v = nn.functional.linear(c, self.fused_weight, self.fused_bias).chunk(2, -1)
        elif fused and context is None:  # one product for all three projections of x
            q, k, v = nn.functional.linear(x, self.fused_weight, self.fused_bias).chunk(3, -1)
        else:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        if self.probs_hook is not None:
            out, probs = attention_math(q, k, v, mask)
            self.probs_hook(probs)
        elif self.backend == "fused":  # the same function in one kernel, A never stored
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.slice_size is not None:
            out = sliced_attention(q, k, v, mask, self.slice_size)
        else:
            out = attention_math(q, k, v, mask)[0]
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))
