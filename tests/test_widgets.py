"""The book's things to play with (minisd/course/widgets.py), its diagrams and its figure cells.

The sliders' callbacks are run here as Jupyter would run them: `explore` builds the ipywidgets,
a test moves a slider (`widget.value = …`) and the view is called again with the new value. The
pictures the views draw are checked against independent formulas where there is one (the SNR
curve, the sinusoidal embedding) and against the pipeline itself elsewhere. The notebooks are
read, not executed (tests/test_notebooks.py runs them): each chapter opens with one diagram cell,
and every figure and widget cell has a picture saved and a caption after it.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

import minisd
from minisd.course import diagrams, figures, widgets
from minisd.tools.cli_generate import BUNDLED_MODEL

nbformat = pytest.importorskip("nbformat")
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def sd():
    return minisd.load(BUNDLED_MODEL)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    matplotlib.pyplot.close("all")


def panel(figure, index: int = 0) -> np.ndarray:
    """The array drawn by imshow in the figure's index-th axes."""
    return np.asarray(figure.axes[index].images[0].get_array(), dtype=np.float64)


def line(figure, axes: int, index: int) -> np.ndarray:
    return np.asarray(figure.axes[axes].lines[index].get_ydata(), dtype=np.float64)


# ---- explore: the sliders call the view again ----------------------------------------------

def test_moving_a_slider_redraws_with_the_new_value():
    pytest.importorskip("ipywidgets")
    calls = []

    def view(t=5, kind="a"):
        calls.append((t, kind))
        return matplotlib.pyplot.figure()

    explorer = widgets.explore(view, t=widgets.Slider(5, 0, 10, 1),
                               kind=widgets.Choice("a", ["a", "b"]))
    assert calls == [(5, "a")]          # the static picture: the defaults
    explorer.widgets["t"].value = 7
    explorer.widgets["kind"].value = "b"
    assert calls == [(5, "a"), (7, "a"), (7, "b")] and explorer.redraws == 2
    assert type(explorer.widgets["t"]).__name__ == "IntSlider"


def test_without_ipywidgets_the_static_picture_is_shown(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)     # import ipywidgets now fails
    explorer = widgets.explore(lambda t=3: matplotlib.pyplot.figure(),
                               t=widgets.Slider(3, 0, 9, 1))
    assert explorer.widgets == {} and explorer.figure is not None
    assert "pip install ipywidgets" in capsys.readouterr().out


# ---- the views, against independent formulas -----------------------------------------------

def test_snr_view_draws_the_schedule_formula():
    """log SNR = log ᾱ/(1 − ᾱ), ᾱ = cumprod(1 − β), β = linspace(√β₀, √β₁, 1000)² (scaled linear),
    computed here in float64. The view's schedule is float32 (as diffusers'); cumprod over 1000
    factors accumulates ~1000 · 6e-8 relative error in ᾱ, and log SNR at t = 999 magnifies a
    relative error of ᾱ by 1/(1 − ᾱ) ≈ 1: 1e-4 absolute on log SNR leaves a margin of ~2x."""
    figure = widgets.snr_view(kind="scaled_linear", beta_start=0.001, beta_end=0.02)
    betas = np.linspace(math.sqrt(0.001), math.sqrt(0.02), 1000) ** 2
    alpha_bar = np.cumprod(1 - betas)
    np.testing.assert_allclose(line(figure, 0, 1), np.log(alpha_bar / (1 - alpha_bar)), atol=1e-4)
    np.testing.assert_allclose(line(figure, 1, 1), alpha_bar, atol=1e-5)
    other = widgets.snr_view(beta_end=0.03)
    assert line(other, 0, 1)[-1] < line(figure, 0, 1)[-1]      # more noise at the end


def test_embedding_view_draws_the_sinusoids():
    """Chapter 3's embedding: [cos(t·f_i), sin(t·f_i)], f_i = 10000^(−i/160), i < 160."""
    figure = widgets.embedding_view(t=123)
    frequencies = np.exp(-math.log(10000) * np.arange(160) / 160)
    expected = np.concatenate([np.cos(123 * frequencies), np.sin(123 * frequencies)])
    # float32 arguments t·f ≤ 123 rad: rounding of t·f is ≤ 123 · 6e-8 ≈ 7e-6
    np.testing.assert_allclose(line(figure, 1, 0), expected, atol=2e-5)


def test_timestep_view_guess_is_good_at_small_t_and_worse_at_large_t(sd):
    view = widgets.timestep_view(sd, "a large red circle on the left")
    early, late = view(t=1), view(t=999)
    clean = panel(early, 0)
    error_early = np.abs(panel(early, 2) - clean).mean()
    error_late = np.abs(panel(late, 2) - clean).mean()
    # At t = 1, x̂₀ = √ᾱ x_t − √(1 − ᾱ) v_θ differs from x₀ by √(1 − ᾱ₁) ≈ 0.04 times the
    # model's error on v: measured 0.001 mean absolute (pixels in [0, 1]); at t = 999 the guess
    # comes from the prompt alone (measured 0.022: the right shape, drawn a little differently).
    assert error_early < 0.01 and error_late > 5 * error_early


def test_generate_view_is_the_pipeline(sd):
    view = widgets.generate_view(sd, ["a small green triangle at the top"])
    figure = view(guidance_scale=3.0, steps=5, eta=0.5, seed=4)
    image = sd.generate("a small green triangle at the top", guidance_scale=3.0, steps=5,
                        eta=0.5, seed=4, output_type="tensor")[0]
    np.testing.assert_allclose(panel(figure), image.permute(1, 2, 0).numpy(), atol=1e-6)
    assert not np.array_equal(panel(view(steps=5, seed=5)), panel(figure))


def test_img2img_view_at_strength_zero_returns_the_start(sd):
    view = widgets.img2img_view(sd)
    figure = view(strength=0.0)
    # strength 0 = the VAE round trip of the start (the bundled VAE: PSNR 41.5 dB, L1 ≈ 0.0034 on
    # a [0, 1] scale); the image at strength 1 is another picture
    assert np.abs(panel(figure, 1) - panel(figure, 0)).mean() < 0.02
    assert np.abs(panel(view(strength=1.0), 1) - panel(figure, 0)).mean() > 0.05


# ---- the 2-D toy of the figures --------------------------------------------------------------

def test_toy_eps_is_minus_sqrt_one_minus_alpha_bar_times_the_score():
    """ε* = −√(1 − ᾱ) ∇ log pₜ, with the gradient taken by autograd of the closed-form density."""
    toy = figures.Toy2D()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    toy64 = figures.Toy2D(toy.means.double(), toy.std, toy.weights.double())
    for a in (0.9, 0.3, 0.01):
        x_ = x.clone().requires_grad_(True)
        score, = torch.autograd.grad(toy64.log_density(x_, a).sum(), x_)
        torch.testing.assert_close(toy64.eps(x, a), -math.sqrt(1 - a) * score)


def test_guidance_scale_one_samples_the_class():
    """With exact ε_c, s = 1 is the conditional model: samples land on the class's blob."""
    toy = figures.Toy2D()
    from minisd.ddim import DDIMSampler
    from minisd.schedule import NoiseSchedule

    start = torch.randn(300, 2, generator=torch.Generator().manual_seed(1))
    end = figures.run_sampler(DDIMSampler(NoiseSchedule(), 50), toy, start, torch.Generator(),
                              component=2, guidance_scale=1.0)[-1]
    assert (end - toy.means[2]).norm(dim=1).max() < 6 * toy.std


# ---- the notebooks' new cells ---------------------------------------------------------------

def tagged(nb, prefix):
    return [c for c in nb.cells if any(t.startswith(prefix) for t in c.metadata.get("tags", []))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_chapter_opens_with_its_diagram(path):
    nb = nbformat.read(path, as_version=4)
    cells = tagged(nb, "book-diagram")
    assert len(cells) == 1, f"{path.name}: {len(cells)} diagram cells"
    index = nb.cells.index(cells[0])
    first_section = next(i for i, c in enumerate(nb.cells)
                         if c.cell_type == "markdown" and c.source.startswith("## "))
    assert index < first_section, f"{path.name}: the diagram comes after the first section"
    assert f'draw("{path.name[:2]}")' in cells[0].source
    assert any("image/png" in o.get("data", {}) for o in cells[0].outputs)


def test_every_chapter_has_a_diagram_and_every_diagram_a_chapter():
    assert {path.name[:2] for path in NOTEBOOKS} == set(diagrams.CHAPTER_DIAGRAMS)


@pytest.mark.parametrize("chapter", sorted(diagrams.CHAPTER_DIAGRAMS))
def test_every_diagram_draws(chapter):
    figure = diagrams.draw(chapter)
    assert figure.axes[0].patches and figure.axes[0].texts


def test_figure_and_widget_cells_have_pictures_and_captions():
    seen = {"book-figure": 0, "book-widget": 0}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for prefix in seen:
            for cell in tagged(nb, prefix):
                if cell.cell_type != "code":
                    continue
                seen[prefix] += 1
                assert any("image/png" in o.get("data", {}) for o in cell.outputs), \
                    f"{path.name} {cell.id}: no picture saved"
                after = nb.cells[nb.cells.index(cell) + 1]
                assert after.cell_type == "markdown" and after.source.startswith("**"), \
                    f"{path.name} {cell.id}: no caption after it"
    assert seen == {"book-figure": 8, "book-widget": 6}


def test_every_chapter_links_to_the_glossary():
    glossary = (ROOT / "notebooks" / "README.md").read_text(encoding="utf-8")
    assert '<a id="glossary"></a>' in glossary
    for path in NOTEBOOKS:
        text = "".join(c.source for c in nbformat.read(path, as_version=4).cells)
        assert "README.md#glossary" in text, path.name
