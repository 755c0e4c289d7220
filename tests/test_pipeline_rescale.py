"""Guidance rescale (Lin et al. 2024, sec. 3.4, eq. 15-16) against diffusers' `rescale_noise_cfg`
and `StableDiffusionPipeline(..., guidance_rescale=φ)`, and sampler objects handed to `generate`
(the way to reach the DDIM/DDPM options a sampler's name cannot carry)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minisd.ddim import DDIMSampler
from minisd.guidance import rescale_guidance
from minisd.samplers import make_sampler
from minisd.schedule import NoiseSchedule, ScheduleConfig, X0Limits
from reference_models import rel_err
from test_pipeline import SIZE, build_references, diffusers_pipeline, reference_embeds, tiny_config

# Full-pipeline parity bound, as the other pipeline parity tests: minisd's and diffusers' UNets
# agree to ~1e-6 relative per call (different kernels, different summation orders); CFG at s = 7.5
# multiplies the disagreement of ε_c − ε_u by s (≤ ~8×) and 10 steps carry it along, which stays
# well inside 1e-4 of the latents' largest magnitude. Rescale only adds a ratio of two stds, each
# a mean over 4·16·16 numbers, whose relative error is of the same order as the inputs'.
TOL = 1e-4


# -------------------------------------------------------------------------------------------------
# (a) the function


def paper_rescale(guided: np.ndarray, conditional: np.ndarray, phi: float) -> np.ndarray:
    """Eq. 15-16 written out in float64 numpy, independent of torch: per batch item, the sample
    standard deviation (ddof=1, Bessel's correction, as torch.std and so diffusers)."""
    out = np.empty_like(guided)
    for b in range(guided.shape[0]):
        ratio = conditional[b].std(ddof=1) / guided[b].std(ddof=1)
        out[b] = phi * guided[b] * ratio + (1 - phi) * guided[b]
    return out


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_equals_diffusers_rescale_noise_cfg_and_the_equation(phi):
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    gen = torch.Generator().manual_seed(0)
    uncond = torch.randn(3, 4, 16, 16, generator=gen)
    # per-item scales, so that each item's std ratio differs (a batch-wide std would be caught)
    cond = uncond + torch.randn(3, 4, 16, 16, generator=gen) * torch.tensor([0.2, 1.0, 3.0]).view(
        -1, 1, 1, 1
    )
    guided = uncond + 7.5 * (cond - uncond)
    ours = rescale_guidance(guided, cond, phi)
    theirs = rescale_noise_cfg(guided, cond, guidance_rescale=phi)
    # Float32, n = 1024 numbers per std: a pairwise/blocked sum of n terms errs by at most
    # ~log2(n)·2⁻²⁴ relative, twice (two stds), plus ~4 roundings for the division, the two
    # products and the sum: (2·10 + 4)·2⁻²⁴ ≈ 1.4e-6, doubled for the float32 reference's own
    # rounding.
    bound = 2 * (2 * math.log2(1024) + 4) * 2.0**-24
    assert rel_err(ours, theirs) <= bound
    expected = paper_rescale(guided.double().numpy(), cond.double().numpy(), phi)
    assert rel_err(ours, torch.from_numpy(expected)) <= bound


def test_rescale_properties():
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 4, 8, 8, generator=gen)
    guided = 5 * torch.randn(2, 4, 8, 8, generator=gen)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)  # φ = 0 is plain CFG
    full = rescale_guidance(guided, cond, 1.0)  # φ = 1: the std of the conditional prediction
    std = lambda x: x.flatten(1).std(dim=1)  # noqa: E731
    torch.testing.assert_close(std(full), std(cond), rtol=1e-6, atol=0)
    # eq. 16 is linear in φ between the two ends
    torch.testing.assert_close(
        rescale_guidance(guided, cond, 0.25), 0.25 * full + 0.75 * guided, rtol=1e-6, atol=1e-6
    )


# -------------------------------------------------------------------------------------------------
# (b) the whole pipeline


@pytest.fixture(scope="module")
def v_refs():
    return build_references(tiny_config("v_prediction"), seed=1)


ZERO_SNR = dict(
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    set_alpha_to_one=False,
    clip_sample=False,  # diffusers' DDIMScheduler clips by default; SD's configs turn it off
)


def diffusers_images(refs, scheduler_options, guidance_rescale, eta=0.0):
    import diffusers

    sd, (_, _, text) = refs
    pipe = diffusers_pipeline("txt2img", refs, "v_prediction")
    pipe.scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        **scheduler_options,
    )
    return pipe(
        **reference_embeds(sd, text, "a red circle on the left", "blurry"),
        num_inference_steps=10,
        guidance_scale=7.5,
        guidance_rescale=guidance_rescale,
        eta=eta,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(42),
        output_type="latent",
    ).images


def test_zero_snr_trailing_v_prediction_with_rescale_matches_diffusers(v_refs):
    """Lin et al.'s recipe end to end: zero terminal SNR, trailing timesteps, v-prediction, CFG
    7.5 rescaled with φ = 0.7, the sampler handed to generate as an object."""
    sd = v_refs[0]
    schedule = NoiseSchedule(
        ScheduleConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    )
    sampler = DDIMSampler(schedule, 10, spacing="trailing")
    expected = diffusers_images(v_refs, ZERO_SNR, 0.7)
    got = sd.generate(
        "a red circle on the left",
        negative_prompt="blurry",
        sampler=sampler,
        guidance_scale=7.5,
        guidance_rescale=0.7,
        seed=42,
        output_type="latent",
    )
    assert rel_err(got, expected) <= TOL
    # the rescale is no rounding-level change: it moves the result by far more than TOL
    assert rel_err(diffusers_images(v_refs, ZERO_SNR, 0.0), expected) > 100 * TOL
    # the object was copied, not used up: the same call again gives the same latents
    again = sd.generate(
        "a red circle on the left",
        negative_prompt="blurry",
        sampler=sampler,
        guidance_scale=7.5,
        guidance_rescale=0.7,
        seed=42,
        output_type="latent",
    )
    assert torch.equal(again, got)


def test_ddim_options_through_a_sampler_object_match_diffusers(v_refs):
    """clip_sample, set_alpha_to_one and η > 0: options `sampler="ddim"` cannot carry."""
    sd = v_refs[0]
    options = dict(
        prediction_type="v_prediction",
        clip_sample=True,
        clip_sample_range=0.5,
        set_alpha_to_one=True,
        timestep_spacing="leading",
    )
    expected = diffusers_images(v_refs, options, 0.5, eta=0.3)
    schedule = NoiseSchedule(ScheduleConfig(prediction_type="v_prediction"))
    sampler = DDIMSampler(
        schedule,
        10,
        eta=0.3,
        set_alpha_to_one=True,
        limits=X0Limits(clip_sample=True, clip_sample_range=0.5),
    )
    got = sd.generate(
        "a red circle on the left",
        negative_prompt="blurry",
        sampler=sampler,
        guidance_scale=7.5,
        guidance_rescale=0.5,
        seed=42,
        output_type="latent",
    )
    assert rel_err(got, expected) <= TOL


def test_a_stateful_sampler_object_can_be_reused(v_refs):
    """DPM-Solver++ keeps the previous x̂₀ between steps: each run must start from a fresh copy,
    equal to the sampler made from its name."""
    sd = v_refs[0]
    schedule = NoiseSchedule(ScheduleConfig(prediction_type="v_prediction"))
    sampler = make_sampler("dpmpp_2m", schedule, 6)
    by_name = sd.generate("a cat", sampler="dpmpp_2m", steps=6, seed=3, output_type="latent")
    first = sd.generate("a cat", sampler=sampler, seed=3, output_type="latent")
    second = sd.generate("a cat", sampler=sampler, seed=3, output_type="latent")
    assert torch.equal(first, by_name) and torch.equal(second, by_name)


# -------------------------------------------------------------------------------------------------
# (c) bad values


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]"),
        (dict(guidance_rescale=-0.1), r"guidance_rescale must be in \[0, 1\]"),
        (dict(guidance_rescale=float("nan")), "guidance_rescale must be a number"),
        (dict(guidance_rescale="0.7"), "guidance_rescale must be a number"),
        (dict(sampler=object()), "or a sampler object"),
        (dict(sampler="sampler-object", steps=5), "steps belong to the sampler object"),
        (dict(sampler="sampler-object", eta=0.5), "eta and karras belong to the sampler"),
        (dict(sampler="epsilon-sampler"), "is not the model's"),
    ],
)
def test_bad_values_give_one_clear_error(v_refs, kwargs, message):
    sd = v_refs[0]
    v_schedule = NoiseSchedule(ScheduleConfig(prediction_type="v_prediction"))
    objects = {
        "sampler-object": DDIMSampler(v_schedule, 4),
        "epsilon-sampler": DDIMSampler(NoiseSchedule(), 4),
    }
    if isinstance(kwargs.get("sampler"), str):
        kwargs = {**kwargs, "sampler": objects[kwargs["sampler"]]}
    with pytest.raises(ValueError, match=message):
        sd.generate("a cat", **kwargs)
