"""The Stable Diffusion model: tokenizer, text encoder, UNet, VAE and config in one object, and its
file format.

A minisd file is a safetensors file with the weights under `text_encoder.`, `unet.` and `vae.` and
the `SDConfig` as JSON in the file's metadata, so `load` needs nothing but the file. Tensors that
the official checkpoints carry but minisd does not use (OpenCLIP's text projection, the stored
schedule buffers, ...) live under `extra.` so that converting back gives the original file bit for
bit.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .clip import CLIPTextEncoder
from .config import SDConfig
from .unet import UNet
from .vae import AutoencoderKL

FORMAT_KEY = "minisd_config"
PARTS = ("text_encoder", "unet", "vae")


class StableDiffusion(nn.Module):
    def __init__(self, config: SDConfig):
        super().__init__()
        self.config = config
        self.text_encoder = CLIPTextEncoder(config.text)
        self.unet = UNet(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.extras: dict[str, torch.Tensor] = {}
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import CLIPTokenizer, family_of
            self._tokenizer = CLIPTokenizer(
                pad_token_id=self.config.text.pad_token_id, family=family_of(self.config.text)
            )
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def generate(self, *args, **kwargs):
        """Text to image (and img2img, inpainting): see `minisd.pipeline.generate`."""
        from .pipeline import generate
        return generate(self, *args, **kwargs)


def atomic_write(path: Union[str, Path], write) -> None:
    """Call write(tmp_path), then rename onto `path`: a crash or an error never leaves a
    half-written file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist")
    tmp = _new_empty_file_beside(path)
    try:
        # what open(path, "w") would give: the mode of the file it replaces, else 0o666 less the
        # umask
        mode = stat.S_IMODE(os.stat(path if path.is_file() else tmp).st_mode)
        write(tmp)
        # writers that save through a temporary file of their own (safetensors) leave 0o600
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _new_empty_file_beside(path: Path) -> str:
    """A fresh empty `.NAME.RANDOM.tmp` next to `path`, created as open(path, "w") would create
    `path`.

    Its mode is 0o666 less the umask, applied by the system (tempfile.mkstemp would make it 0o600,
    and the rename would hand that on to the saved file). O_EXCL: never an existing file, nor a link
    planted under the name.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue  # the name is taken: draw another
        return str(tmp)


def state_dict_for_file(sd: StableDiffusion) -> dict[str, torch.Tensor]:
    tensors = {
        f"{part}.{k}": v for part in PARTS for k, v in getattr(sd, part).state_dict().items()
    }
    tensors.update({f"extra.{k}": v for k, v in sd.extras.items()})
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save(sd: StableDiffusion, path: Union[str, Path], dtype: Optional[torch.dtype] = None) -> None:
    """Write `sd` as a minisd safetensors file (optionally cast to `dtype`, e.g. torch.float16)."""
    from safetensors.torch import save_file

    tensors = state_dict_for_file(sd)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    atomic_write(
        path, lambda tmp: save_file(tensors, tmp, metadata={FORMAT_KEY: sd.config.to_json()})
    )


def from_state_dict(
    config: SDConfig, tensors: dict[str, torch.Tensor], source: str = "weights"
) -> StableDiffusion:
    """Build a model from a minisd-named state dict, with a clear error listing
    missing/unexpected/mis-shaped keys."""
    # shapes only: the weights come from `tensors`, so skip the random init
    with torch.device("meta"):
        sd = StableDiffusion(config)
    expected = {
        f"{part}.{k}": v.shape for part in PARTS for k, v in getattr(sd, part).state_dict().items()
    }
    given = {k for k in tensors if not k.startswith("extra.")}
    missing, unexpected = sorted(set(expected) - given), sorted(given - set(expected))
    mismatched = [
        (k, tuple(expected[k]), tuple(tensors[k].shape))
        for k in set(expected) & given
        if tuple(tensors[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        from .weights.errors import describe_key_problems

        raise ValueError(describe_key_problems(source, missing, unexpected, sorted(mismatched)))
    for part in PARTS:
        module = getattr(sd, part)
        prefix = f"{part}."
        module.load_state_dict(
            {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)},
            assign=True,
        )
    sd.extras = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    return sd.eval()


def load(
    path: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    **convert_options,
) -> StableDiffusion:
    """Load a minisd file, or convert an official checkpoint (.ckpt/.safetensors) or a diffusers
    folder in memory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    config_json = None
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                config_json = (f.metadata() or {}).get(FORMAT_KEY)
                shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        except Exception as error:  # safetensors raises its own types for truncated/corrupt headers
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    if config_json is not None:
        from safetensors.torch import load_file

        from .weights.validate import check_config_counts

        config = SDConfig.from_json(config_json)
        check_config_counts(config, shapes, str(path))  # before building: a cheap, clear refusal
        sd = from_state_dict(config, load_file(str(path)), source=str(path))
    else:
        from .weights.convert import load_official_or_diffusers

        sd = load_official_or_diffusers(path, **convert_options)
    return sd.to(device=device, dtype=dtype)
