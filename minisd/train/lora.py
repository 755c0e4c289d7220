"""LoRA: fine-tune a big frozen weight matrix through a small low-rank correction (Hu et al. 2021,
eq. 3).

For a frozen linear layer y = W x + b with W of shape [out, in], LoRA learns A [r, in] and B [out,
r], r ≪ in, out:

    y = W x + b + (α / r) · B A x

B starts at zero, so an adapter that was just added changes nothing; A starts random
(Kaiming-uniform, as nn.Linear) so that B receives a gradient from the first step. α / r keeps the
update's scale roughly independent of the rank. Merging folds the update into the weight, W' = W +
(α / r) · B A: the same function, no extra cost per call; unmerging subtracts it again.

In Stable Diffusion the adapters go on the attention projections to_q, to_k, to_v and to_out of the
UNet's transformer blocks (self- and cross-attention), and optionally of the text encoder. An
adapter file holds only A and B of every wrapped layer (plus, for a new word, the trained rows of
the token embedding) and the settings to rebuild the wrappers: kilobytes to a megabyte, loaded on
top of the unchanged base model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..attention import Attention
from ..files import atomic_write

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
ADAPTER_KEY = "minisd_lora"


class LoRALinear(nn.Module):
    """y = base(x) + (α/r) · up(down(x)), with `base` frozen; down = A [r, in], up = B [out, r]
    (zero at first)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA wraps nn.Linear layers, got {type(base).__name__}")
        if not isinstance(rank, int) or not 1 <= rank <= min(base.in_features, base.out_features):
            raise ValueError(
                f"rank must be an int in [1, {min(base.in_features, base.out_features)}], got "
                f"{rank!r}"
            )
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        # A
        self.down = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        # B
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """(α/r) · B A, the [out, in] update that merging adds to W."""
        return self.scale * self.up @ self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.scale * nn.functional.linear(
            nn.functional.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)
        )

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def attention_modules(module: nn.Module, cross_only: bool = False) -> list[tuple[str, Attention]]:
    """(name, Attention) of every attention layer inside `module` (cross-attention only if
    asked)."""
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, Attention) and (m.is_cross or not cross_only)
    ]


def add_lora(
    module: nn.Module,
    rank: int = 4,
    alpha: Optional[float] = None,
    projections: Iterable[str] = PROJECTIONS,
    cross_only: bool = False,
) -> list[str]:
    """Wrap the chosen projections of every Attention in `module` (e.g. sd.unet) with LoRALinear;
    returns their names.

    Freezes nothing by itself: call `module.requires_grad_(False)` first and train
    `lora_parameters(module)`.
    """
    projections = tuple(projections)
    unknown = set(projections) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown projections {sorted(unknown)}; choose from {PROJECTIONS}")
    alpha = float(rank if alpha is None else alpha)
    wrapped = []
    for name, attention in attention_modules(module, cross_only):
        for projection in projections:
            layer = getattr(attention, projection)
            if isinstance(layer, LoRALinear):
                raise ValueError(f"{name}.{projection} already has a LoRA adapter")
            setattr(attention, projection, LoRALinear(layer, rank, alpha))
            wrapped.append(f"{name}.{projection}")
    if not wrapped:
        raise ValueError(f"no attention projections found in {type(module).__name__}")
    return wrapped


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for layer in lora_layers(module).values() for p in (layer.down, layer.up)]


def merge_lora(module: nn.Module) -> None:
    for layer in lora_layers(module).values():
        layer.merge()


def unmerge_lora(module: nn.Module) -> None:
    for layer in lora_layers(module).values():
        layer.unmerge()


def remove_lora(module: nn.Module, merge: bool = True) -> None:
    """Put plain nn.Linear layers back (with the update folded in if `merge`): the model saves as a
    normal file."""
    for name, layer in list(lora_layers(module).items()):
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.base.requires_grad_(True))


# ---------------------------------------------------------------- adapter files


def adapter_state(sd, token_ids: Iterable[int] = ()) -> dict[str, torch.Tensor]:
    """A and B of every LoRA layer of the model (keys 'unet.…to_q.down'), plus trained
    token-embedding rows."""
    tensors = {}
    for part in ("unet", "text_encoder"):
        for name, layer in lora_layers(getattr(sd, part)).items():
            tensors[f"{part}.{name}.down"] = layer.down.detach()
            tensors[f"{part}.{name}.up"] = layer.up.detach()
    token_ids = sorted(set(int(i) for i in token_ids))
    if token_ids:
        tensors["token_ids"] = torch.tensor(token_ids, dtype=torch.long)
        tensors["token_embeddings"] = sd.text_encoder.token_embedding.weight.detach()[token_ids]
    return tensors


def save_adapter(
    sd, path: Union[str, Path], token_ids: Iterable[int] = (), info: Optional[dict] = None
) -> None:
    """Write only the adapter (not the base model) as safetensors, with its settings as metadata."""
    layers = {
        **{f"unet.{n}": m for n, m in lora_layers(sd.unet).items()},
        **{f"text_encoder.{n}": m for n, m in lora_layers(sd.text_encoder).items()},
    }
    if not layers:
        raise ValueError("the model has no LoRA layers to save: call add_lora first")
    if any(m.merged for m in layers.values()):
        raise ValueError(
            "unmerge the LoRA layers before saving the adapter (merged weights are part of the "
            "base)"
        )
    ranks = {m.rank for m in layers.values()}
    alphas = {m.alpha for m in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(
            f"save_adapter expects one rank and alpha for all layers, got ranks {ranks}, alphas "
            f"{alphas}"
        )
    settings = {
        "rank": ranks.pop(),
        "alpha": alphas.pop(),
        "layers": sorted(layers),
        "base": sd.config.name,
        "info": info or {},
    }
    tensors = {
        k: (v.float() if v.is_floating_point() else v).contiguous().cpu()
        for k, v in adapter_state(sd, token_ids).items()
    }
    atomic_write(
        path, lambda tmp: save_file(tensors, tmp, metadata={ADAPTER_KEY: json.dumps(settings)})
    )


def load_adapter(sd, path: Union[str, Path]) -> dict:
    """Add the adapter's LoRA layers to `sd` (if not there yet), load A, B and token rows; returns
    its settings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    if ADAPTER_KEY not in metadata:
        raise ValueError(f"{path} is not a minisd LoRA adapter (no '{ADAPTER_KEY}' metadata)")
    settings = json.loads(metadata[ADAPTER_KEY])
    for part in ("unet", "text_encoder"):
        names = [n[len(part) + 1 :] for n in settings["layers"] if n.startswith(part + ".")]
        existing = lora_layers(getattr(sd, part))
        for name in names:
            if name in existing:
                continue
            parent_name, _, child = name.rpartition(".")
            try:
                parent = getattr(sd, part).get_submodule(parent_name)
                base = getattr(parent, child)
            except AttributeError:
                raise ValueError(
                    f"adapter {path} has a layer {part}.{name} that this model does not have "
                    f"(it was trained on {settings['base']!r})"
                ) from None
            setattr(parent, child, LoRALinear(base, settings["rank"], settings["alpha"]))
    layers = {
        **{f"unet.{n}": m for n, m in lora_layers(sd.unet).items()},
        **{f"text_encoder.{n}": m for n, m in lora_layers(sd.text_encoder).items()},
    }
    with torch.no_grad():
        for name in settings["layers"]:
            layer = layers[name]
            for which in ("down", "up"):
                value = tensors[f"{name}.{which}"]
                target = getattr(layer, which)
                if value.shape != target.shape:
                    raise ValueError(
                        f"adapter {path}: {name}.{which} has shape {list(value.shape)}, the model "
                        f"needs {list(target.shape)} (trained on {settings['base']!r})"
                    )
                target.copy_(value)
        if "token_ids" in tensors:
            sd.text_encoder.token_embedding.weight[tensors["token_ids"].long()] = tensors[
                "token_embeddings"
            ].to(sd.text_encoder.token_embedding.weight.dtype)
    return settings
