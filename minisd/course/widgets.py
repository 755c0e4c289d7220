"""Things to play with: sliders that redraw a picture; a static picture wherever no kernel runs.

    explore(view, t=Slider(500, 0, 999, 1))

draws `view(t=500)` (a function returning a matplotlib Figure) as an ordinary output, so GitHub,
the website and a notebook opened without a kernel show the picture for the default values. In a
live Jupyter kernel with ipywidgets installed, sliders appear above it and every change calls
`view` again and replaces the picture in place (IPython's `display(..., display_id=True)` handle).
Without ipywidgets the picture alone is shown, with a one-line note.

The views are plain functions of their controls (below), so tests call them directly and through
an `Explorer`'s widgets (tests/test_widgets.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import torch

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@dataclass
class Slider:
    default: float
    low: float
    high: float
    step: float = 1

    def widget(self, name: str):
        import ipywidgets

        kind = ipywidgets.IntSlider if all(float(v).is_integer() for v in
                                           (self.default, self.low, self.high, self.step)) \
            else ipywidgets.FloatSlider
        return kind(value=self.default, min=self.low, max=self.high, step=self.step,
                    description=name, continuous_update=False)


@dataclass
class Choice:
    default: object
    options: Sequence

    def widget(self, name: str):
        import ipywidgets

        return ipywidgets.Dropdown(value=self.default, options=list(self.options),
                                   description=name)


class Explorer:
    """The live part of `explore`: the widgets, and `redraw()` which calls the view again."""

    def __init__(self, view: Callable, controls: dict, handle):
        self.view, self.controls, self.handle = view, controls, handle
        self.widgets: dict = {}
        self.redraws = 0
        self.figure = None                 # the last picture drawn

    def values(self) -> dict:
        if self.widgets:
            return {name: w.value for name, w in self.widgets.items()}
        return {name: c.default for name, c in self.controls.items()}

    def redraw(self, change=None):
        figure = self.view(**self.values())
        if self.handle is not None:        # None outside a kernel (IPython then only prints)
            self.handle.update(figure)
        plt.close(figure)
        self.figure = figure
        self.redraws += 1
        return figure


def explore(view: Callable, **controls) -> Explorer:
    """Show view(**defaults) now; add sliders that redraw it when ipywidgets is there."""
    from IPython.display import display

    defaults = {name: c.default for name, c in controls.items()}
    try:
        import ipywidgets
    except ImportError:
        ipywidgets = None
    explorer = Explorer(view, controls, handle=None)
    if ipywidgets is not None:
        explorer.widgets = {name: c.widget(name) for name, c in controls.items()}
        box = ipywidgets.VBox(list(explorer.widgets.values()))
        bundle = box._repr_mimebundle_() or {}
        ranges = ", ".join(_describe(name, c) for name, c in controls.items())
        # What GitHub and the website show instead of the live sliders:
        bundle["text/plain"] = f"[sliders in a live Jupyter kernel: {ranges}; below: the defaults]"
        display(bundle, raw=True)
    else:
        print("(pip install ipywidgets for sliders; this is the picture for the default values)")
    figure = view(**defaults)
    explorer.handle = display(figure, display_id=True)
    explorer.figure = figure
    plt.close(figure)
    for widget in explorer.widgets.values():
        widget.observe(explorer.redraw, names="value")
    return explorer


def _describe(name: str, control) -> str:
    if isinstance(control, Slider):
        return f"{name} {control.low:g}…{control.high:g}"
    return f"{name} ∈ {{{', '.join(str(o) for o in control.options)}}}"


# ---- the views ------------------------------------------------------------------------------

def _show(ax, image: torch.Tensor, title: str):
    """image [3, H, W] in [-1, 1]."""
    ax.imshow(((image + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=8.5)
    ax.axis("off")


def timestep_view(sd, prompt: str = "a large red circle on the left", seed: int = 0):
    """A view of t: the noised latent x_t (decoded) and the model's one-shot guess x̂₀ from it.

    x₀ is a picture the model made for `prompt`; x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε with one fixed ε.
    """
    from .figures import model_schedule

    schedule = model_schedule(sd)
    x0 = sd.generate(prompt, seed=seed, steps=20, guidance_scale=1.5, output_type="latent")
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        context = sd.text_encoder(sd.tokenizer([prompt]))

    def decode(latent):
        with torch.no_grad():
            return sd.vae.decode(latent / sd.config.latent_scale)[0]

    clean = decode(x0)

    def view(t: int = 500):
        t = int(t)
        x_t = schedule.q_sample(x0, t, noise)
        with torch.no_grad():
            output = sd.unet(x_t, torch.tensor([t]), context)
        x0_hat, _ = schedule.predict_x0_and_eps(output, x_t, t)
        a = float(schedule.alphas_cumprod[t])
        fig, axes = plt.subplots(1, 3, figsize=(6.6, 2.5))
        _show(axes[0], clean, "$x_0$")
        _show(axes[1], decode(x_t), f"$x_t$, t = {t} ($\\sqrt{{\\bar\\alpha_t}}$ = {a ** 0.5:.2f})")
        _show(axes[2], decode(x0_hat), "$\\hat x_0$: the one-shot guess")
        fig.tight_layout()
        return fig

    return view


def snr_view(kind: str = "scaled_linear", beta_start: float = 0.00085, beta_end: float = 0.012):
    """log SNR(t) = log ᾱ_t/(1 − ᾱ_t) and ᾱ_t for a β range, beside Stable Diffusion's."""
    from ..schedule import NoiseSchedule, ScheduleConfig

    low, high = sorted((float(beta_start), float(beta_end)))
    mine = NoiseSchedule(ScheduleConfig(beta_schedule=kind, beta_start=low, beta_end=high))
    sd_default = NoiseSchedule()
    t = torch.arange(mine.num_train_timesteps)
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for schedule, label, style in ((sd_default, "SD: scaled_linear 0.00085 … 0.012", "--"),
                                   (mine, f"{kind} {low:g} … {high:g}", "-")):
        a = schedule.alphas_cumprod.double()
        axes[0].plot(t, torch.log(a / (1 - a)), style, label=label)
        axes[1].plot(t, a, style, label=label)
    axes[0].set_ylabel("log SNR(t)")
    axes[1].set_ylabel("$\\bar\\alpha_t$")
    end = float(mine.alphas_cumprod[-1])
    axes[1].set_title(f"$\\bar\\alpha_{{999}}$ = {end:.2g}: at t = 999 a fraction "
                      f"$\\sqrt{{\\bar\\alpha}}$ = {end ** 0.5:.3f} of the signal is left",
                      fontsize=9)
    for ax in axes:
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7.5)
    fig.tight_layout()
    return fig


def embedding_view(t: int = 500, dim: int = 320):
    """The sinusoidal timestep embedding of t (chapter 3), against those of every t."""
    from ..resnet import timestep_embedding

    every = timestep_embedding(torch.arange(0, 1000, 5), dim)       # [200, dim]
    mine = timestep_embedding(torch.tensor([int(t)]), dim)[0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.8), gridspec_kw={"width_ratios": [1.3, 1]})
    axes[0].imshow(every.T, aspect="auto", cmap="RdBu_r", extent=(0, 1000, dim, 0))
    axes[0].axvline(int(t), color="black", linewidth=1.5)
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("embedding channel")
    axes[0].set_title("every t (columns); the line is yours", fontsize=9)
    axes[1].plot(mine, linewidth=0.8)
    axes[1].set_xlabel("channel (cos half, then sin half)")
    axes[1].set_title(f"the {dim} numbers the UNet is told for t = {int(t)}", fontsize=9)
    fig.tight_layout()
    return fig


def generate_view(sd, prompts: Sequence[str]):
    """A view of generate's settings: prompt, guidance scale, steps, η, seed -> the picture."""

    def view(prompt: str = prompts[0], guidance_scale: float = 1.5, steps: int = 20,
             eta: float = 0.0, seed: int = 0):
        image = sd.generate(prompt, guidance_scale=float(guidance_scale), steps=int(steps),
                            eta=float(eta), seed=int(seed), output_type="tensor")[0]
        fig, ax = plt.subplots(figsize=(2.6, 2.9))
        _show(ax, image * 2 - 1, f"s = {float(guidance_scale):g}, {int(steps)} steps, "
                                 f"η = {float(eta):g}, seed {int(seed)}")
        fig.tight_layout()
        return fig

    return view


def img2img_view(sd, prompt: str = "a large blue square on the right",
                 start: str = "a large red circle on the left", steps: int = 20):
    """A view of image-to-image: strength, guidance scale, seed -> the edited picture."""
    init = sd.generate(start, seed=0, steps=steps, guidance_scale=1.5, output_type="tensor")

    def view(strength: float = 0.6, guidance_scale: float = 1.5, seed: int = 0):
        image = sd.generate(prompt, init_image=init, strength=float(strength), steps=steps,
                            guidance_scale=float(guidance_scale), seed=int(seed),
                            output_type="tensor")[0]
        fig, axes = plt.subplots(1, 2, figsize=(4.6, 2.6))
        _show(axes[0], init[0] * 2 - 1, f'start: "{start}"')
        _show(axes[1], image * 2 - 1,
              f"strength {float(strength):g}, s = {float(guidance_scale):g}")
        fig.suptitle(f'prompt: "{prompt}"', fontsize=8.5)
        fig.tight_layout()
        return fig

    return view
