"""Where does each word of the prompt act? Cross-attention maps collected during generation.

Every cross-attention layer of the UNet computes, for each latent pixel p and prompt token k,
    A[p, k] = softmax_k(q_p · k_k / √d)          (a distribution over the 77 tokens: Σₖ A[p, k] = 1)
Averaging A over heads, layers (each upsampled bilinearly to the latent resolution) and steps gives
one map per token, the picture behind "prompt-to-prompt" (Hertz et al. 2022). Averages of
distributions are distributions, so the maps still sum to 1 over the tokens at every pixel.

    with record_cross_attention(sd) as maps:
        sd.generate("a red circle", steps=20)
    maps.per_token(image=0)      # [77, h, w]   (latent resolution)
    maps.tokens(image=0)         # ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', …]

The maps are those of the last `generate` call inside the block, for the conditional rows of the
batch. The recorder belongs to the model it listens to (`sd.attention_recorder` while the block
runs): recording one model never touches another.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from einops import reduce
from torch.nn import functional as F

class CrossAttentionMaps:
    def __init__(self, sd):
        self.sd = sd
        # [rows, tokens, h, w], float32, summed over calls
        self._sum: Optional[torch.Tensor] = None
        self._calls = 0
        # per image: its conditional rows of the UNet batch
        self._rows: list[list[int]] = []
        self._ids: Optional[torch.Tensor] = None  # [rows, tokens]
        self._size = (0, 0)

    def begin(
        self, part_rows: list[list[int]], ids: torch.Tensor, latent_size: tuple[int, int]
    ) -> None:
        """Called by generate before its first step: which batch rows to keep, their token ids, the
        latent size."""
        self._rows, self._ids, self._size = part_rows, ids.cpu(), tuple(latent_size)
        self._sum, self._calls = None, 0

    def hook(self, probs: torch.Tensor) -> None:
        """probs [rows, heads, h·w, tokens] from one cross-attention layer."""
        if not self._rows:
            return
        height, width = self._size
        per_pixel = reduce(probs.detach().float(), "b heads n m -> b m n", "mean")
        # how far this layer is downsampled
        factor = round((height * width / per_pixel.shape[-1]) ** 0.5)
        maps = per_pixel.reshape(*per_pixel.shape[:2], height // factor, width // factor)
        if factor != 1:
            maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
        maps = maps.cpu()
        self._sum = maps if self._sum is None else self._sum + maps
        self._calls += 1

    def _row(self, image: int, part: int) -> int:
        if self._sum is None:
            raise ValueError(
                "no cross-attention was recorded: call generate inside the `with` block"
            )
        if not 0 <= image < len(self._rows) or not 0 <= part < len(self._rows[image]):
            raise ValueError(
                f"no image {image} / part {part}: the last generate made {len(self._rows)} images "
                f"with {[len(r) for r in self._rows]} parts"
            )
        return self._rows[image][part]

    def per_token(self, image: int = 0, part: int = 0) -> torch.Tensor:
        """[tokens, h, w]: the attention each latent pixel paid to each token, averaged over heads,
        layers, steps."""
        return self._sum[self._row(image, part)] / self._calls

    def tokens(self, image: int = 0, part: int = 0) -> list[str]:
        """The token strings matching per_token's first dimension."""
        tokenizer = self.sd.tokenizer
        return [tokenizer.id_to_token[i] for i in self._ids[self._row(image, part)].tolist()]


RECORDER = "attention_recorder"  # the attribute of a model that holds its recorder while recording


def active_recorder(sd) -> Optional[CrossAttentionMaps]:
    return getattr(sd, RECORDER, None)


def announce_batch(members: list, conditionings: list, latent_size) -> None:
    """Before the first step: tell each recording model which rows of its UNet batch are which
    image's prompt parts, and their token ids (guidance.Conditioning)."""
    for (model, _), cond in zip(members, conditionings):
        recorder = active_recorder(model)
        if recorder is not None:
            owner = cond.row_image.tolist()
            rows = [[r for r in cond.part_rows.tolist() if owner[r] == b]
                    for b in range(cond.num_images)]
            recorder.begin(rows, cond.ids, latent_size)


@contextlib.contextmanager
def record_cross_attention(sd):
    """Attach a recorder to every cross-attention layer of `sd.unet` for the duration of the
    block."""
    if active_recorder(sd) is not None:
        raise ValueError("cross-attention of this model is already being recorded")
    recorder = CrossAttentionMaps(sd)
    layers = [m for m in sd.unet.modules() if getattr(m, "is_cross", False)]
    previous = [layer.probs_hook for layer in layers]
    for layer in layers:
        layer.probs_hook = recorder.hook
    setattr(sd, RECORDER, recorder)
    try:
        yield recorder
    finally:
        setattr(sd, RECORDER, None)
        for layer, hook in zip(layers, previous):
            layer.probs_hook = hook
