"""A tiny CLIP: an image tower and a text tower pretrained contrastively on captioned images.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", fig. 3) maps an image and a caption to unit vectors of one shared space,

    u_i = normalize(W_img · ImageTower(x_i))               image x_i [3, H, W]   -> [D]
    v_j = normalize(W_txt · TextTower(ids_j)[eos_j])       caption ids_j [n]     -> [D]

and scores every image of a batch against every caption of the batch:

    logits_ij = s · u_iᵀ v_j,      s = exp(τ), τ learned, τ₀ = ln(1/0.07), s clamped at 100

The symmetric InfoNCE loss asks each image to pick its own caption out of the N captions, and each
caption its own image out of the N images (one N-way classification per row and per column):

    L = ½ · [ (1/N) Σ_i −log softmax_j(logits_i·)_i  +  (1/N) Σ_j −log softmax_i(logits_·j)_j ]

The N − 1 other pairs in the batch are the negatives; s sets how sharply the softmax separates
them (a temperature 1/s), and is learned along with the towers.

Image tower: CLIP's Vision Transformer (Dosovitskiy et al. 2021): P×P patches, each linearly
embedded (a stride-P convolution), a learned class token prepended, learned position embeddings,
LayerNorm, pre-LN transformer layers — the very same layer as the text encoder's (clip.py), only
without the causal mask — and LayerNorm of the class token's final state.

Text tower: minisd's CLIP text encoder (clip.py) over the real 49,408-token BPE vocabulary. The
sentence embedding is the final state of the [EOS] token: under the causal mask, token i sees only
tokens 0 … i, so EOS, the last token of every caption, is the only position that has read all of
it.

The default sizes fit 32×32 images: a 4-layer ViT of width 128 on 8×8 patches (a 4×4 grid of
them: 4×4 patches cost 4× the compute and did no better overall; see the README's model card), the
bundled diffusion model's 3-layer text tower of width 64, and a 64-dimensional shared space. The
weights in minisd/assets/tiny_clip.safetensors (float16, 8.3 MB) load with `load_tiny_clip()`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from .checks import check_tensor
from .clip import CLIPTextEncoder, TextEncoderConfig, TextEncoderLayer
from .files import atomic_write

BUNDLED_CLIP = Path(__file__).with_name("assets") / "tiny_clip.safetensors"
FORMAT_KEY = "minisd_tiny_clip_config"


@dataclass
class ImageTowerConfig:
    image_size: int = 32
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    activation: str = "quick_gelu"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


@dataclass
class TinyCLIPConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    # the bundled diffusion model's text encoder (config.bundled): one could condition it on this
    text: TextEncoderConfig = field(
        default_factory=lambda: TextEncoderConfig(width=64, layers=3, heads=4)
    )
    embed_dim: int = 64
    init_temperature: float = 0.07  # s₀ = 1/0.07 (CLIP, section 2.5)
    max_logit_scale: float = 100.0  # "clipped to prevent scaling the logits by more than 100"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TinyCLIPConfig":
        data = json.loads(text)
        image = ImageTowerConfig(**data.pop("image"))
        text_config = TextEncoderConfig(**data.pop("text"))
        return cls(image=image, text=text_config, **data)


class ImageTower(nn.Module):
    """CLIP's ViT: images [B, 3, H, W] in [-1, 1] -> the class token's final state [B, width]."""

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        self.cfg = cfg
        patches = (cfg.image_size // cfg.patch_size) ** 2
        # x_p W for every P×P patch x_p at once: a convolution with kernel = stride = P
        self.patch_embedding = nn.Conv2d(
            3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(cfg.width**-0.5 * torch.randn(cfg.width))
        self.position_embedding = nn.Parameter(0.01 * torch.randn(patches + 1, cfg.width))
        self.norm_pre = nn.LayerNorm(cfg.width, eps=1e-5)
        # The text encoder's pre-LN layer, reused (it reads width, heads, mlp_ratio, activation).
        layer_shape = TextEncoderConfig(
            width=cfg.width, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, activation=cfg.activation
        )
        self.layers = nn.ModuleList(TextEncoderLayer(layer_shape) for _ in range(cfg.layers))
        self.norm_post = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_tensor("image tower input", images, 4, "[B, 3, H, W]", channels=3)
        size = self.cfg.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"image tower takes {size}×{size} images, got {tuple(images.shape[-2:])}"
            )
        h = self.patch_embedding(images).flatten(2).transpose(1, 2)  # [B, patches, width]
        cls = self.class_embedding.to(h.dtype).expand(h.shape[0], 1, -1)  # [B, 1, width]
        h = torch.cat([cls, h], dim=1) + self.position_embedding.to(h.dtype)
        h = self.norm_pre(h)
        for layer in self.layers:
            h = layer(h, mask=None)  # every patch sees every patch: no causal mask
        return self.norm_post(h[:, 0])


def eos_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B] index of the first [EOS] in each row of ids [B, n] (every row must have one)."""
    is_eos = ids == eos_token_id
    if not bool(is_eos.any(dim=1).all()):
        raise ValueError(f"every caption needs an end-of-text token ({eos_token_id})")
    return is_eos.int().argmax(dim=1)  # argmax returns the first of equal maxima


class TinyCLIP(nn.Module):
    """Image tower, text tower, two projections into a shared space, and the learned logit
    scale."""

    def __init__(self, config: Optional[TinyCLIPConfig] = None):
        super().__init__()
        self.config = config = config if config is not None else TinyCLIPConfig()
        self.image_tower = ImageTower(config.image)
        self.text_tower = CLIPTextEncoder(config.text)
        self.image_projection = nn.Linear(config.image.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))
        self._tokenizer = None
        # CLIP's initialisation: small token and position embeddings, projections of unit gain.
        nn.init.normal_(self.text_tower.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_tower.position_embedding.weight, std=0.01)
        nn.init.normal_(self.image_projection.weight, std=config.image.width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=config.text.width**-0.5)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import CLIPTokenizer

            self._tokenizer = CLIPTokenizer(pad_token_id=self.config.text.pad_token_id)
        return self._tokenizer

    @property
    def logit_scale(self) -> torch.Tensor:
        """s = exp(τ), at most max_logit_scale (the trainer also clamps τ after every step)."""
        return self.log_logit_scale.exp().clamp(max=self.config.max_logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """τ ← min(τ, ln s_max), after an optimizer step, as CLIP and OpenCLIP do."""
        self.log_logit_scale.clamp_(max=math.log(self.config.max_logit_scale))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> u [B, D], unit length."""
        return F.normalize(self.image_projection(self.image_tower(images)), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, n] (BOS, caption, EOS, padding) -> v [B, D], unit length."""
        eos = eos_positions(ids, self.tokenizer.eos_token_id)
        # Under the causal mask nothing after a row's EOS reaches its EOS state: running only up to
        # the batch's last EOS gives the same v (and gradients) as running all 77 tokens.
        ids = ids[:, : int(eos.max()) + 1]
        states = self.text_tower(ids)  # [B, n, width]
        sentence = states[torch.arange(len(ids), device=ids.device), eos]  # [B, width]: EOS state
        return F.normalize(self.text_projection(sentence), dim=-1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Strings -> v [B, D] (tokenize, then encode_text)."""
        return self.encode_text(self.tokenizer(prompts).to(self.log_logit_scale.device))

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """logits_ij = s · u_iᵀ v_j for images [N, 3, H, W] and captions [M, n]: [N, M]."""
        return self.logit_scale * self.encode_image(images) @ self.encode_text(ids).T


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """The symmetric InfoNCE loss of square logits [N, N] whose diagonal holds the matching pairs.

        L = ½ · [ CE(logits, rows pick i) + CE(logitsᵀ, columns pick j) ]

    CE over rows: each image classifies which of the N captions is its own; over columns: each
    caption classifies which of the N images is its own. L = ln N when all logits are equal.
    """
    check_tensor("logits", logits, 2, "[N, N]")
    if logits.shape[0] != logits.shape[1]:
        raise ValueError(f"contrastive loss needs square logits [N, N], got {tuple(logits.shape)}")
    targets = torch.arange(len(logits), device=logits.device)
    image_to_text = F.cross_entropy(logits.float(), targets)
    text_to_image = F.cross_entropy(logits.float().T, targets)
    return (image_to_text + text_to_image) / 2


# ---------------------------------------------------------------- the file: weights and config


def save_tiny_clip(
    model: TinyCLIP, path: Union[str, Path], dtype: Optional[torch.dtype] = None
) -> None:
    """Weights as safetensors (optionally cast, e.g. to torch.float16), config as JSON metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {FORMAT_KEY: model.config.to_json()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tiny_clip(
    path: Union[str, Path, None] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TinyCLIP:
    """A TinyCLIP from a file written by save_tiny_clip; no path: the one bundled with minisd."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else BUNDLED_CLIP
    if not path.is_file():
        raise FileNotFoundError(f"no tiny CLIP file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            config_json = (f.metadata() or {}).get(FORMAT_KEY)
    except Exception as error:  # safetensors raises its own types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    if config_json is None:
        raise ValueError(f"{path} is not a tiny CLIP file (no {FORMAT_KEY!r} in its metadata)")
    with torch.device("meta"):  # shapes only: the weights come from the file
        model = TinyCLIP(TinyCLIPConfig.from_json(config_json))
    tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    try:
        model.load_state_dict(tensors, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match its own config: {error}") from None
    return model.to(device=device, dtype=dtype).eval()
