"""The book's figures: the plotting helpers behind the chapters' pictures, in one module.

Two kinds of figure:

* On a 2-D toy (`Toy2D`: a mixture of K Gaussians) the best possible noise predictor is known in
  closed form, so samplers and guidance can be watched without training anything. For data
  x₀ ~ Σₖ wₖ N(mₖ, s²I), the noised marginal is pₜ(x) = Σₖ wₖ N(x; √ᾱ mₖ, (ᾱs² + 1 − ᾱ) I), and
  the ε that minimises the training loss is E[ε | xₜ] = −√(1 − ᾱ) ∇log pₜ(xₜ) (Tweedie's formula):
      ε*(x) = √(1 − ᾱ) Σₖ rₖ(x) (x − √ᾱ mₖ) / (ᾱs² + 1 − ᾱ),   rₖ = posterior weight of component k.
  The samplers stepping on it are minisd's own (`DDPMSampler`, `DDIMSampler`).
* On the bundled model (`minisd/assets/bundled.safetensors`): attention per head, self-attention
  inside the UNet, latent interpolation, the latent channels of a photograph.

Every function returns a matplotlib Figure; the notebooks print the caption beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..ddim import DDIMSampler
from ..ddpm import DDPMSampler
from ..schedule import NoiseSchedule, ScheduleConfig


@dataclass
class Toy2D:
    """A mixture of Gaussians in the plane; `component` picks one of them (a "class")."""
    means: torch.Tensor = field(default_factory=lambda: torch.tensor(
        [[-1.2, -0.6], [1.2, -0.6], [0.0, 1.3]]))
    std: float = 0.18
    weights: torch.Tensor = field(default_factory=lambda: torch.tensor([0.45, 0.35, 0.2]))

    def sample(self, n: int, generator: torch.Generator, component: int | None = None):
        if component is None:
            k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            k = torch.full((n,), component)
        return self.means[k] + self.std * torch.randn(n, 2, generator=generator)

    def eps(self, x: torch.Tensor, alpha_bar: float, component: int | None = None):
        """ε*(x) = E[ε | xₜ = x] for the whole mixture, or for one component (x: [N, 2])."""
        a = float(alpha_bar)
        var = a * self.std ** 2 + 1 - a
        centres = math.sqrt(a) * self.means                                    # [K, 2]
        sq = ((x[:, None, :] - centres[None]) ** 2).sum(-1)                    # [N, K]
        logits = torch.log(self.weights)[None] - sq / (2 * var)
        if component is not None:
            logits = torch.full_like(logits, -math.inf)
            logits[:, component] = 0.0
        r = logits.softmax(dim=1)                                             # rₖ(x)
        return math.sqrt(1 - a) * (r[..., None] * (x[:, None, :] - centres[None])).sum(1) / var

    def log_density(self, x: torch.Tensor, alpha_bar: float):
        a = float(alpha_bar)
        var = a * self.std ** 2 + 1 - a
        sq = ((x[:, None, :] - math.sqrt(a) * self.means[None]) ** 2).sum(-1)
        return torch.logsumexp(torch.log(self.weights)[None] - sq / (2 * var), dim=1) \
            - math.log(2 * math.pi * var)


def _grid(lim: float, n: int):
    g = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    return xx, yy, torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def _density_background(ax, toy: Toy2D, alpha_bar: float, lim: float = 2.6):
    xx, yy, points = _grid(lim, 120)
    density = toy.log_density(points, alpha_bar).exp().reshape(xx.shape)
    ax.contourf(xx, yy, density, levels=12, cmap="Greys", alpha=0.6)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def run_sampler(sampler, toy: Toy2D, x: torch.Tensor, generator: torch.Generator,
                component: int | None = None, guidance_scale: float | None = None):
    """Run a minisd sampler on the toy with the exact ε; returns the path [steps + 1, N, 2].

    With `guidance_scale` s, ε = ε_u + s (ε_c − ε_u): ε_u of the whole mixture, ε_c of `component`.
    """
    path = [x]
    schedule = sampler.schedule
    for t in sampler.timesteps.tolist():
        a = float(schedule.alphas_cumprod[t])
        if guidance_scale is None:
            eps = toy.eps(x, a, component)
        else:
            eps_u, eps_c = toy.eps(x, a), toy.eps(x, a, component)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = sampler.step(eps, t, x, generator=generator).prev_sample
        path.append(x)
    return torch.stack(path)


def ddpm_vs_ddim(n_paths: int = 4, ddim_steps: int = 50, ddpm_steps: int = 1000, seed: int = 0):
    """Paths of DDPM (1000 random steps) and DDIM (50 deterministic steps) from the same x_T."""
    toy, schedule = Toy2D(), NoiseSchedule()
    start = torch.randn(n_paths, 2, generator=torch.Generator().manual_seed(seed))
    ddpm_sampler = DDPMSampler(schedule, None if ddpm_steps == 1000 else ddpm_steps)
    ddpm = run_sampler(ddpm_sampler, toy, start, torch.Generator().manual_seed(seed + 1))
    ddim = run_sampler(DDIMSampler(schedule, ddim_steps), toy, start, torch.Generator())
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    colours = plt.cm.tab10(np.arange(n_paths) % 10)
    for ax, path, name in ((axes[0], ddpm, f"DDPM, {ddpm_steps} random steps"),
                           (axes[1], ddim, f"DDIM (η = 0), {ddim_steps} steps")):
        _density_background(ax, toy, float(schedule.alphas_cumprod[0]))
        for i in range(n_paths):
            ax.plot(path[:, i, 0], path[:, i, 1], color=colours[i], linewidth=0.6, alpha=0.8)
            ax.plot(*path[0, i], "o", color=colours[i], markersize=4, markerfacecolor="white")
            ax.plot(*path[-1, i], "o", color=colours[i], markersize=5)
        ax.set_title(name, fontsize=10)
    fig.suptitle("From the same starting noise $x_T$ (open circles) to samples (dots)", fontsize=10)
    fig.tight_layout()
    return fig


def score_field(timesteps=(20, 200, 500, 900)):
    """−ε*(x, t) as arrows over the noised density pₜ, at a few timesteps."""
    toy, schedule = Toy2D(), NoiseSchedule()
    fig, axes = plt.subplots(1, len(timesteps), figsize=(3 * len(timesteps), 3.2))
    _, _, points = _grid(2.4, 15)
    spacing = 4.8 / 14
    for ax, t in zip(axes, timesteps):
        a = float(schedule.alphas_cumprod[t])
        _density_background(ax, toy, a)
        arrows = -toy.eps(points, a)           # ∝ ∇ log pₜ: towards more probable points
        longest = float(arrows.norm(dim=1).max())
        shown = arrows / longest * spacing * 0.95   # the longest arrow spans one grid cell
        ax.quiver(points[:, 0], points[:, 1], shown[:, 0], shown[:, 1], color="#a33",
                  angles="xy", scale_units="xy", scale=1, width=0.006)
        ax.set_title(f"t = {t}, $\\bar\\alpha_t$ = {a:.3f}; longest |ε*| {longest:.1f}",
                     fontsize=8.5)
    fig.suptitle("$-\\varepsilon^*(x_t, t)$, the best noise prediction with its sign flipped, over "
                 "$p_t$: it points towards the data (it is $\\sqrt{1-\\bar\\alpha_t}\\,"
                 "\\nabla\\log p_t$)", fontsize=9.5)
    fig.tight_layout()
    return fig


def posterior_1d(x0: float = 1.0, eps: float = -1.0, timesteps=(10, 100, 400, 800)):
    """Densities of q(x_{t−1} | x₀) and of the posterior q(x_{t−1} | x_t, x₀), in one dimension."""
    schedule = NoiseSchedule()
    sampler = DDPMSampler(schedule)                     # every timestep: previous of t is t − 1
    fig, axes = plt.subplots(1, len(timesteps), figsize=(3 * len(timesteps), 2.8), sharey=False)
    grid = torch.linspace(-3.5, 3.5, 800)
    for ax, t in zip(axes, timesteps):
        a_t, a_prev = (float(schedule.alphas_cumprod[t]), float(schedule.alphas_cumprod[t - 1]))
        x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
        mean, var = sampler.posterior(torch.tensor([x0]), torch.tensor([x_t]), t)
        prior = _gauss(grid, math.sqrt(a_prev) * x0, 1 - a_prev)
        post = _gauss(grid, float(mean), float(var))
        prior, post = prior / prior.max(), post / post.max()     # each scaled to a peak of 1
        ax.plot(grid, prior, color="#888", label="$q(x_{t-1}\\mid x_0)$")
        ax.fill_between(grid, post, color="#c44", alpha=0.4, label="$q(x_{t-1}\\mid x_t, x_0)$")
        ax.axvline(x0, color="#262", linestyle="--", linewidth=1)
        ax.axvline(x_t, color="#226", linestyle=":", linewidth=1.2)
        ax.set_title(f"t = {t}: mean {float(mean):.2f}, std {math.sqrt(float(var)):.3f}",
                     fontsize=8.5)
        ax.set_yticks([])
    axes[0].legend(fontsize=7.5, loc="upper left")
    fig.suptitle(f"$x_0$ = {x0} (green dashes), $x_t$ (blue dots) made with ε = {eps}; "
                 "densities scaled to a peak of 1", fontsize=9.5)
    fig.tight_layout()
    return fig


def _gauss(x: torch.Tensor, mean: float, var: float) -> torch.Tensor:
    return torch.exp(-(x - mean) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)


def guidance_toy(scales=(0.0, 1.0, 3.0, 7.5), component: int = 2, n: int = 400, seed: int = 0):
    """Samples of the toy's class `component` under classifier-free guidance at several scales."""
    toy, schedule = Toy2D(), NoiseSchedule()
    start = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    fig, axes = plt.subplots(1, len(scales), figsize=(3 * len(scales), 3.2))
    for ax, s in zip(axes, scales):
        path = run_sampler(DDIMSampler(schedule, 50), toy, start, torch.Generator(),
                           component=component, guidance_scale=s)
        _density_background(ax, toy, float(schedule.alphas_cumprod[0]))
        end = path[-1]
        ax.scatter(end[:, 0], end[:, 1], s=3, color="#a33")
        spread = float(end.std(0).mean())
        ax.set_title(f"s = {s:g}: spread {spread:.2f}", fontsize=9)
    fig.suptitle(f"DDIM samples of class {component} (the top blob) with guidance scale s "
                 f"(its own spread: {toy.std})", fontsize=9.5)
    fig.tight_layout()
    return fig


# ---- figures on the bundled model ------------------------------------------------------------

def model_schedule(sd) -> NoiseSchedule:
    """The noise schedule a model was trained with (from its config)."""
    c = sd.config
    return NoiseSchedule(ScheduleConfig(
        beta_schedule=c.beta_schedule, num_train_timesteps=c.num_train_timesteps,
        beta_start=c.beta_start, beta_end=c.beta_end, prediction_type=c.prediction_type))


def _context(sd, prompts):
    with torch.no_grad():
        return sd.text_encoder(sd.tokenizer(list(prompts)))


def capture_attention(sd, prompt: str, seed: int = 0, t: int = 400, which: str = "attn2",
                      steps: int = 20):
    """Attention probabilities of every UNet layer named `…{which}` for one noised sample.

    The clean latent is a picture the model makes for `prompt` (seeded), noised to step t with
    q(x_t | x_0); one UNet call at t records each layer's softmax. Returns (image [3, H, W] in
    [0, 1], {layer name: probs [heads, n_pixels, n_keys]}, token strings).
    """
    latent = sd.generate(prompt, seed=seed, steps=steps, guidance_scale=1.5, output_type="latent")
    with torch.no_grad():
        image = ((sd.vae.decode(latent / sd.config.latent_scale)[0] + 1) / 2).clamp(0, 1)
    schedule = model_schedule(sd)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed + 1))
    x_t = schedule.q_sample(latent, t, noise)
    layers = {name: m for name, m in sd.unet.named_modules() if name.endswith(which)}
    probs = {}

    def recorder(name):
        return lambda p: probs.__setitem__(name, p[0].detach().float())

    for name, layer in layers.items():
        layer.probs_hook = recorder(name)
    try:
        with torch.no_grad():
            sd.unet(x_t, torch.tensor([t]), _context(sd, [prompt]))
    finally:
        for layer in layers.values():
            layer.probs_hook = None
    ids = sd.tokenizer([prompt])[0].tolist()
    tokens = [sd.tokenizer.id_to_token[i] for i in ids]
    return image, probs, tokens


def attention_per_head(sd, prompt="a large red circle on the left and a small blue square on "
                       "the right", words=("red", "circle", "blue", "square"), seed=0,
                       layer="down_levels.0.attentions.0.blocks.0.attn2"):
    """Cross-attention maps of one layer, one row per head, one column per word."""
    image, probs, tokens = capture_attention(sd, prompt, seed)
    p = probs[layer]                                          # [heads, n, 77]
    side = int(round(p.shape[1] ** 0.5))
    columns = [tokens.index(w + "</w>") for w in words]
    heads = p.shape[0]
    fig, axes = plt.subplots(heads + 1, len(words) + 1, figsize=(1.5 * (len(words) + 1),
                                                                 1.5 * (heads + 1)))
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0, 0].set_title("the picture", fontsize=8)
    for j, (word, col) in enumerate(zip(words, columns)):
        mean = p[:, :, col].mean(0).reshape(side, side)
        axes[0, j + 1].imshow(mean, cmap="viridis", vmin=0)
        axes[0, j + 1].set_title(f'"{word}", mean', fontsize=8)
        for h in range(heads):
            axes[h + 1, j + 1].imshow(p[h, :, col].reshape(side, side), cmap="viridis", vmin=0)
    for h in range(heads):
        axes[h + 1, 0].text(0.5, 0.5, f"head {h}", ha="center", va="center", fontsize=9)
    fig.suptitle(f"Cross-attention per head, {layer.split('.blocks')[0]}", fontsize=9)
    fig.tight_layout()
    return fig


def self_attention_maps(sd, prompt="a large red circle on the left and a small blue square on "
                        "the right", queries=((4, 2), (4, 6), (1, 4)), seed=0,
                        layer="down_levels.0.attentions.0.blocks.0.attn1"):
    """Where a few query pixels (8×8 grid) look, in one self-attention layer (mean of heads)."""
    image, probs, _ = capture_attention(sd, prompt, seed, which="attn1")
    p = probs[layer].mean(0)                                 # [n, n]
    side = int(round(p.shape[0] ** 0.5))
    fig, axes = plt.subplots(1, len(queries) + 1, figsize=(2.1 * (len(queries) + 1), 2.3))
    for ax in axes:
        ax.axis("off")
    scale = image.shape[-1] / side
    axes[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0].set_title("the picture", fontsize=8)
    for ax, (row, col), marker in zip(axes[1:], queries, "ox^s"):
        row, col = row * side // 8, col * side // 8          # queries are given on an 8×8 grid
        ax.imshow(p[row * side + col].reshape(side, side), cmap="magma", vmin=0)
        ax.plot(col, row, marker, color="cyan", markersize=7, markerfacecolor="none")
        ax.set_title(f"query pixel ({row}, {col})", fontsize=8)
        axes[0].plot((col + 0.5) * scale - 0.5, (row + 0.5) * scale - 0.5, marker, color="cyan",
                     markersize=7, markerfacecolor="none")
    fig.suptitle(f"Self-attention from one latent pixel to all {side}×{side}, "
                 f"{layer.split('.blocks')[0]}", fontsize=9)
    fig.tight_layout()
    return fig


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation: keeps the norm of Gaussian noise (a straight line shrinks it)."""
    cos = (a * b).sum() / (a.norm() * b.norm())
    angle = torch.arccos(cos.clamp(-1, 1))
    if float(angle) < 1e-6:
        return (1 - w) * a + w * b
    return (torch.sin((1 - w) * angle) * a + torch.sin(w * angle) * b) / torch.sin(angle)


def latent_interpolation(sd, prompt="a large magenta triangle at the top", seeds=(0, 1),
                         count: int = 7, steps: int = 30):
    """Images from noise that moves from seed a's x_T to seed b's along a great circle."""
    side = sd.config.image_size
    with torch.no_grad():   # the latent shape, whatever the VAE's downscale
        size = sd.vae.encode(torch.zeros(1, 3, side, side)).mean.shape
    a, b = (torch.randn(size, generator=torch.Generator().manual_seed(s)) for s in seeds)
    weights = np.linspace(0, 1, count)
    latents = torch.cat([slerp(a, b, float(w)) for w in weights])
    images = sd.generate([prompt] * count, latents=latents, steps=steps, guidance_scale=1.5,
                         output_type="tensor")
    fig, axes = plt.subplots(1, count, figsize=(1.4 * count, 1.7))
    for ax, image, w in zip(axes, images, weights):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(f"w = {w:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f'"{prompt}": x_T = slerp(seed {seeds[0]}, seed {seeds[1]}, w), DDIM', fontsize=9)
    fig.tight_layout()
    return fig


def photograph(size: int = 128):
    """scikit-image's astronaut (Eileen Collins, NASA; public domain): [1, 3, size, size], ±1."""
    from skimage import data

    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(size, size), mode="area")
    return image * 2 - 1


def latent_channels(sd, size: int = 128):
    """A photograph, the four channels of its VAE latent (posterior mean), and the decoding."""
    image = photograph(size)
    with torch.no_grad():
        latent = sd.vae.encode(image).mean                      # [1, 4, size/f, size/f]
        decoded = sd.vae.decode(latent)
    fig, axes = plt.subplots(1, 6, figsize=(12, 2.4))
    axes[0].imshow(((image[0] + 1) / 2).permute(1, 2, 0).numpy())
    axes[0].set_title(f"photograph {size}×{size}×3", fontsize=8)
    for k in range(latent.shape[1]):
        axes[k + 1].imshow(latent[0, k], cmap="RdBu_r")
        axes[k + 1].set_title(f"latent channel {k} ({latent.shape[-1]}×{latent.shape[-1]})",
                              fontsize=8)
    axes[5].imshow(((decoded[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy())
    axes[5].set_title("decoded back", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig
