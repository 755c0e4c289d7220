"""The σ-based samplers (minisd/samplers/) against diffusers' schedulers and the math they
implement.

Without diffusers the fixture tests replay trajectories diffusers computed
(tests/fixtures/make_sampler_fixture.py); with it, live tests compare every sampler × {ε, v} ×
{default, Karras} × spacing step by step, each chain fed by a toy model of its own state.

Tolerance 1e-6 (relative and absolute): both sides run the same float32 operations in the same
order on values of size ≤ 15 (σ_max = 14.6), so each step may differ only by the last bits of the
σ's (computed in float64 then rounded, by numpy on one side and torch on the other) and of
transcendental functions (log, exp); one float32 ulp at 15 is 1e-6. Ten steps of the toy chains
stay below 1e-6 (measured worst: 8e-7, DPM-Solver++ 2M at 25 steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minisd.ddim import DDIMSampler
from minisd.samplers import SAMPLER_NAMES, make_sampler
from minisd.samplers.sigma_schedule import karras_sigmas, sigma_to_t
from minisd.schedule import NoiseSchedule, ScheduleConfig

FIXTURE = Path(__file__).parent / "fixtures" / "sampler_reference.safetensors"
TOL = dict(rtol=1e-6, atol=1e-6)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
SIGMA_SAMPLERS = ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde")


def schedule(prediction_type="epsilon", **options):
    return NoiseSchedule(ScheduleConfig(prediction_type=prediction_type, **options))


def toy_model(x, t):
    """A deterministic stand-in for the UNet whose output depends on x and t."""
    return torch.sin(1.3 * x + 0.002 * float(t)) + 0.3 * x


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def reference_scheduler(diffusers, name, prediction_type, karras, spacing, **config):
    classes = {
        "euler": diffusers.EulerDiscreteScheduler,
        "euler_a": diffusers.EulerAncestralDiscreteScheduler,
        "heun": diffusers.HeunDiscreteScheduler,
        "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
        "dpmpp_2m_sde": diffusers.DPMSolverMultistepScheduler,
    }
    settings = dict(SD, prediction_type=prediction_type, timestep_spacing=spacing, **config)
    if name == "dpmpp_2m_sde":
        settings["algorithm_type"] = "sde-dpmsolver++"
    if karras:
        settings["use_karras_sigmas"] = True
    return classes[name](**settings)


# -------------------------------------------------------------------------------------------------
# against diffusers, live


@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("karras", [False, True])
def test_trajectory_matches_diffusers(diffusers, name, prediction_type, karras):
    if karras and name == "euler_a":
        pytest.skip("diffusers' EulerAncestralDiscreteScheduler has no Karras option (see below)")
    for spacing, num_steps in [("linspace", 10), ("leading", 7), ("trailing", 7), ("linspace", 1)]:
        reference = reference_scheduler(diffusers, name, prediction_type, karras, spacing)
        reference.set_timesteps(num_steps)
        sampler = make_sampler(
            name, schedule(prediction_type), num_steps, karras=karras, spacing=spacing
        )
        where = f"{name} {prediction_type} karras={karras} {spacing} N={num_steps}"
        torch.testing.assert_close(
            sampler.timesteps, reference.timesteps.float(), **TOL, msg=where
        )
        torch.testing.assert_close(sampler.sigmas, reference.sigmas, **TOL, msg=where)
        assert float(sampler.init_noise_sigma) == pytest.approx(
            float(reference.init_noise_sigma), rel=1e-6
        )
        gen = torch.Generator().manual_seed(num_steps)
        x = x_ref = torch.randn(2, 4, 8, 8, generator=gen) * float(sampler.init_noise_sigma)
        # Euler ancestral draws its own noise: both sides get generators in the same state
        gen_ours, gen_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        for t, t_ref in zip(sampler.timesteps.tolist(), reference.timesteps):
            x_in = sampler.scale_model_input(x, t)
            x_in_ref = reference.scale_model_input(x_ref, t_ref)
            torch.testing.assert_close(x_in, x_in_ref, **TOL, msg=where)
            z = torch.randn(x.shape, generator=gen)
            if name == "euler_a":
                ours = sampler.step(toy_model(x_in, t), t, x, generator=gen_ours)
                theirs = reference.step(toy_model(x_in_ref, t_ref), t_ref, x_ref, generator=gen_ref)
            elif name == "dpmpp_2m_sde":
                ours = sampler.step(toy_model(x_in, t), t, x, variance_noise=z)
                theirs = reference.step(toy_model(x_in_ref, t_ref), t_ref, x_ref, variance_noise=z)
            else:
                ours = sampler.step(toy_model(x_in, t), t, x)
                theirs = reference.step(toy_model(x_in_ref, t_ref), t_ref, x_ref)
            torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, **TOL, msg=where)
            expected_x0 = (
                reference.model_outputs[-1]
                if name.startswith("dpmpp")
                else theirs.pred_original_sample
            )
            torch.testing.assert_close(ours.pred_x0, expected_x0, **TOL, msg=where)
            x, x_ref = ours.prev_sample, theirs.prev_sample


@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
def test_zero_terminal_snr_sigmas_match_diffusers(diffusers, name):
    """rescale_betas_zero_snr with trailing spacing: ᾱ_{T−1} is set to 2⁻²⁴ so σ_max stays
    finite."""
    if name == "heun":
        pytest.skip("diffusers' HeunDiscreteScheduler has no rescale_betas_zero_snr option")
    reference = reference_scheduler(
        diffusers, name, "v_prediction", False, "trailing", rescale_betas_zero_snr=True
    )
    reference.set_timesteps(10)
    sampler = make_sampler(
        name, schedule("v_prediction", rescale_betas_zero_snr=True), 10, spacing="trailing"
    )
    torch.testing.assert_close(sampler.sigmas, reference.sigmas, **TOL)
    torch.testing.assert_close(sampler.timesteps, reference.timesteps.float(), **TOL)


@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
def test_img2img_timesteps_and_add_noise_match_diffusers(diffusers, name):
    from diffusers import StableDiffusionImg2ImgPipeline

    reference = reference_scheduler(diffusers, name, "epsilon", False, "linspace")
    reference.set_timesteps(10)
    pipeline = type("P", (), {"scheduler": reference})()
    sampler = make_sampler(name, schedule(), 10)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    for strength in (0.3, 0.75, 1.0):
        expected, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipeline, 10, strength, "cpu")
        ours = sampler.timesteps_for_strength(strength)
        torch.testing.assert_close(ours, expected.float(), **TOL)
        reference._begin_index, reference._step_index = None, None
        torch.testing.assert_close(
            sampler.add_noise(x0, noise, ours[0].item()),
            reference.add_noise(x0, noise, expected[:1]),
            **TOL,
        )


# ----------------------------------------------------------------------------------------- fixture
# (no diffusers needed)


def _load_fixture():
    with safe_open(FIXTURE, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, json.loads(f.metadata()["cases"])


def test_fixture_trajectories():
    tensors, cases = _load_fixture()
    assert len(cases) >= 18
    for name, case in cases.items():
        sampler = make_sampler(
            case["sampler"],
            schedule(case["prediction_type"]),
            case["num_steps"],
            karras=case["karras"],
            spacing=case["spacing"],
        )
        torch.testing.assert_close(sampler.timesteps, tensors[f"{name}.timesteps"], **TOL)
        torch.testing.assert_close(sampler.sigmas, tensors[f"{name}.sigmas"], **TOL)
        x = tensors[f"{name}.x_T"]
        for i, t in enumerate(sampler.timesteps.tolist()):
            where = lambda message: f"{name}, call {i}: {message}"  # noqa: E731
            scaled = sampler.scale_model_input(x, t)
            torch.testing.assert_close(
                scaled, tensors[f"{name}.scaled_inputs"][i], **TOL, msg=where
            )
            noise = tensors[f"{name}.noise"][i] if sampler.stochastic else None
            out = sampler.step(tensors[f"{name}.model_outputs"][i], t, x, variance_noise=noise)
            torch.testing.assert_close(out.pred_x0, tensors[f"{name}.pred_x0"][i], **TOL, msg=where)
            torch.testing.assert_close(
                out.prev_sample, tensors[f"{name}.prev_samples"][i], **TOL, msg=where
            )
            x = out.prev_sample


# -------------------------------------------------------------------------------------- properties
# the chapter teaches


def test_karras_sigmas_are_eq5_of_edm():
    """σᵢ^(1/ρ) is evenly spaced from σ_max^(1/ρ) to σ_min^(1/ρ) (ρ = 7), ends included."""
    sigmas = karras_sigmas(0.03, 14.6, 12)
    roots = sigmas ** (1 / 7)
    torch.testing.assert_close(roots.diff(), torch.full((11,), roots.diff()[0].item()).double())
    assert sigmas[0].item() == pytest.approx(14.6) and sigmas[-1].item() == pytest.approx(0.03)


def test_sigma_to_t_inverts_the_training_sigmas():
    train = schedule().alphas_cumprod
    train_sigmas = ((1 - train) / train) ** 0.5
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(sigma_to_t(train_sigmas[t], train_sigmas), t.double())


def test_euler_step_is_ddim_in_the_sigma_variable():
    """With ε-prediction one Euler step from σ(t) to σ(prev) is exactly DDIM (η = 0), divided by
    √ᾱ: x₀ + σ_prev·ε̂ = x_prev / √ᾱ_prev (chapter 12)."""
    sched = schedule()
    ddim = DDIMSampler(sched, 10, spacing="leading")
    euler = make_sampler("euler", sched, 10, spacing="leading")
    assert torch.equal(euler.timesteps, ddim.timesteps.float())
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 8, 8, generator=gen)
    for t in ddim.timesteps.tolist()[:-1]:
        eps = torch.randn(1, 4, 8, 8, generator=gen)
        a_t, a_prev = ddim.alpha_bars(t, x_t)
        x_prev = ddim.step(eps, t, x_t).prev_sample
        euler_x = euler.step(eps, float(t), x_t / a_t.sqrt()).prev_sample
        # float32: values ≤ ~15 after dividing by √ᾱ, a few ulps each
        torch.testing.assert_close(euler_x, x_prev / a_prev.sqrt(), rtol=1e-5, atol=1e-5)


def test_euler_ancestral_karras_is_the_ancestral_step_on_karras_sigmas():
    """diffusers offers no Karras option for Euler ancestral: check it against the formula
    (k-diffusion's get_ancestral_step) on the Karras sigmas that Euler uses (checked above)."""
    sched = schedule("v_prediction")
    sampler = make_sampler("euler_a", sched, 8, karras=True)
    euler = make_sampler("euler", sched, 8, karras=True)
    assert torch.equal(sampler.sigmas, euler.sigmas)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64) * sampler.init_noise_sigma
    for i, t in enumerate(sampler.timesteps.tolist()):
        v, z = torch.randn(2, 1, 4, 8, 8, generator=gen, dtype=torch.float64)
        s, s_next = sampler.sigmas[i].double(), sampler.sigmas[i + 1].double()
        x0 = x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * v
        up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        down = (s_next**2 - up**2) ** 0.5
        expected = x + (x - x0) / s * (down - s) + up * z
        out = sampler.step(v, t, x, variance_noise=z)
        torch.testing.assert_close(out.prev_sample.double(), expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_heun_lists_each_model_evaluation():
    sampler = make_sampler("heun", schedule(), 5)
    t = sampler.timesteps.tolist()
    assert len(t) == 2 * 5 - 1 and t[1] == t[2] and t[3] == t[4]
    assert sampler.sigmas[-1] == 0 and len(sampler.sigmas) == len(t) + 1


@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
def test_oracle_model_recovers_x0(name):
    """Fed the exact ε of a single known x₀, every deterministic sampler lands on x₀ (the ODE's
    solution through a point mass is a straight line in x = x₀ + σ·ε)."""
    sched = schedule()
    sampler = make_sampler(name, sched, 6, karras=True)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 4, 8, 8, generator=gen)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    x = sampler.add_noise(x0, noise, sampler.timesteps[0].item())
    if name.startswith("dpmpp"):  # xₜ itself: ε = (xₜ − αx₀)/σ
        def eps_of(x_in, i):
            alpha, sigma = sampler.alpha_sigma(sampler.sigmas[i])
            return (x_in - alpha * x0) / sigma
    else:  # the UNet sees x/√(σ²+1); ε = (x − x₀)/σ
        def eps_of(x_in, i):
            s = sampler.sigmas[i]
            return (x_in * (s**2 + 1) ** 0.5 - x0) / s
    for i, t in enumerate(sampler.timesteps.tolist()):
        z = torch.randn(1, 4, 8, 8, generator=gen) if sampler.stochastic else None
        x = sampler.step(eps_of(sampler.scale_model_input(x, t), i), t, x, variance_noise=z)
        x = x.prev_sample
    torch.testing.assert_close(x, x0, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------- registry, input


def test_registry_and_cli_agree():
    from minisd.tools.cli_generate import SAMPLER_NAMES as CLI_NAMES

    assert CLI_NAMES == SAMPLER_NAMES


def test_bad_input_messages():
    sched = schedule()
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        make_sampler("lms", sched, 10)
    with pytest.raises(ValueError, match="karras sigmas apply to the σ-based samplers"):
        make_sampler("ddim", sched, 10, karras=True)
    with pytest.raises(ValueError, match="eta applies to the DDIM sampler only"):
        make_sampler("euler", sched, 10, eta=0.5)
    with pytest.raises(ValueError, match="'linspace', 'leading', 'trailing'"):
        make_sampler("euler", sched, 10, spacing="karras")
    sampler = make_sampler("euler", sched, 4)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="is not one of this sampler's timesteps"):
        sampler.step(x, 500.0, x)
    t = sampler.timesteps.tolist()
    sampler.step(x, t[0], x)
    with pytest.raises(ValueError, match=f"expected the step at t={t[1]} next"):
        sampler.step(x, t[2], x)


# ------------------------------------------------------------------------------------- the pipeline
# sd.generate(sampler=..., karras=...) against diffusers' pipelines with the same scheduler, on tiny
# random-weight models (tests/reference_models.py); tolerance as tests/test_pipeline.py (1e-4
# relative: the UNet's float32 sums, not the samplers, set it)

PIPELINE_CASES = [
    ("txt2img", "euler_a", False),
    ("txt2img", "heun", True),
    ("txt2img", "dpmpp_2m", True),
    ("txt2img", "dpmpp_2m_sde", True),
    ("img2img", "heun", False),
    ("img2img", "dpmpp_2m", False),
]


@pytest.fixture(scope="module")
def pipeline_refs():
    pytest.importorskip("transformers")
    from test_pipeline import build_references, tiny_config

    return build_references(tiny_config())


@pytest.mark.parametrize("kind,name,karras", PIPELINE_CASES)
def test_generate_matches_diffusers_pipeline(diffusers, pipeline_refs, kind, name, karras):
    from test_pipeline import SIZE, diffusers_pipeline, random_image, reference_embeds
    from reference_models import rel_err

    sd, (_, _, text) = pipeline_refs
    pipe = diffusers_pipeline(kind, pipeline_refs)
    # SD's scheduler config as diffusers' from_config reads it: no timestep_spacing, so "linspace"
    pipe.scheduler = reference_scheduler(diffusers, name, "epsilon", karras, "linspace")
    image = dict(image=random_image(1), strength=0.6) if kind == "img2img" else {}
    size = {} if kind == "img2img" else dict(height=SIZE, width=SIZE)
    expected = pipe(
        **reference_embeds(sd, text, "a blue square", "blurry"), **image, **size,
        num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images
    init = dict(init_image=image["image"], strength=0.6) if image else {}
    got = sd.generate(
        "a blue square", negative_prompt="blurry", **init, **size, steps=6, guidance_scale=5.0,
        sampler=name, karras=karras, seed=7, output_type="latent",
    )
    assert rel_err(got, expected) <= 1e-4
