"""Noise schedules and the DDIM / DDPM samplers, checked against diffusers and against the math they
implement.

Reference: diffusers' DDIMScheduler / DDPMScheduler configured as Stable Diffusion ships them.
Without diffusers the fixture tests still replay trajectories that diffusers computed
(tests/fixtures/make_scheduler_fixture.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from minisd.ddim import DDIMSampler
from minisd.ddpm import DDPMSampler
from minisd.schedule import NoiseSchedule, ScheduleConfig

FIXTURE = Path(__file__).parent / "fixtures" / "scheduler_reference.safetensors"
SD = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    steps_offset=1,
)
KINDS = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
TOL = dict(rtol=1e-6, atol=1e-6)


def schedule(prediction_type="epsilon", beta_schedule="scaled_linear", **options):
    return NoiseSchedule(
        ScheduleConfig(beta_schedule=beta_schedule, prediction_type=prediction_type, **options)
    )


def toy_model(x, t):
    """A deterministic stand-in for the UNet: output depends on x and t, so errors would feed back
    along the chain."""
    return torch.sin(1.3 * x + 0.002 * float(t)) + 0.3 * x


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


# -------------------------------------------------------------------------------------------------
# against diffusers


@pytest.mark.parametrize("kind", KINDS)
def test_alphas_cumprod_match_diffusers(diffusers, kind):
    reference = diffusers.DDIMScheduler(
        beta_schedule=KINDS[kind], beta_start=0.00085, beta_end=0.012
    )
    mine = schedule(beta_schedule=kind)
    torch.testing.assert_close(mine.betas, reference.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(mine.alphas_cumprod, reference.alphas_cumprod, rtol=1e-6, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers_for_every_step_count(diffusers, spacing, steps_offset):
    mine = schedule()
    ddim = diffusers.DDIMScheduler(**{**SD, "steps_offset": steps_offset}, timestep_spacing=spacing)
    ddpm = diffusers.DDPMScheduler(**{**SD, "steps_offset": steps_offset}, timestep_spacing=spacing)
    for n in range(1, 1001):
        ours = mine.sampling_timesteps(n, spacing, steps_offset)
        assert len(ours) == n and bool((ours[:-1] > ours[1:]).all())
        for reference in (ddim, ddpm) if n in (10, 50, 61, 1000) else (ddim,):
            reference.set_timesteps(n)
            theirs = reference.timesteps
            # diffusers' np.arange overshoots for some N ("trailing", e.g. N=61) ...
            if len(theirs) == n + 1:
                # ... with an invalid t = −1 that we drop
                assert spacing == "trailing" and theirs[-1] == -1
                theirs = theirs[:n]
            assert torch.equal(ours, theirs), (spacing, steps_offset, n)


def test_sd_leading_timesteps(diffusers):
    assert DDIMSampler(schedule(), 50).timesteps.tolist() == list(range(981, 0, -20))


def _diffusers_prev_agrees(timesteps, num_steps):
    """diffusers' DDIM steps to t − T//N; ours to the next listed timestep. Compare only where those
    coincide."""
    ours = timesteps[1:].tolist() + [-1]
    theirs = [t - 1000 // num_steps for t in timesteps.tolist()]
    return all(p == q or (p == -1 and q < 0) for p, q in zip(ours, theirs))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    "spacing,num_steps", [("leading", 10), ("leading", 50), ("trailing", 50), ("trailing", 1000)]
)
def test_ddim_trajectory_matches_diffusers(diffusers, prediction_type, spacing, num_steps):
    for eta in (0.0, 0.5, 1.0):
        sampler = DDIMSampler(schedule(prediction_type), num_steps, eta=eta, spacing=spacing)
        assert _diffusers_prev_agrees(sampler.timesteps, num_steps)
        reference = diffusers.DDIMScheduler(
            **SD, set_alpha_to_one=False, prediction_type=prediction_type, timestep_spacing=spacing
        )
        reference.set_timesteps(num_steps)
        assert torch.equal(sampler.timesteps, reference.timesteps)

        gen = torch.Generator().manual_seed(num_steps)
        x = x_ref = torch.randn(2, 4, 8, 8, generator=gen)
        for t in sampler.timesteps:  # two independent chains, each fed its own model output
            z = torch.randn(x.shape, generator=gen)
            ours = sampler.step(toy_model(x, t), t, x, variance_noise=z)
            theirs = reference.step(toy_model(x_ref, t), t, x_ref, eta=eta, variance_noise=z)
            torch.testing.assert_close(ours.pred_x0, theirs.pred_original_sample, **TOL)
            torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, **TOL)
            x, x_ref = ours.prev_sample, theirs.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [None, 50, 10])
def test_ddpm_trajectory_matches_diffusers(diffusers, prediction_type, num_steps):
    sampler = DDPMSampler(schedule(prediction_type), num_steps)
    reference = diffusers.DDPMScheduler(**SD, prediction_type=prediction_type)
    if num_steps is not None:
        reference.set_timesteps(num_steps)
    assert torch.equal(sampler.timesteps, reference.timesteps)

    x = x_ref = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    # Same seed on both sides: the chains agree only if both draw the same noise at the same steps
    # (t > 0).
    gen, gen_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in sampler.timesteps:
        ours = sampler.step(toy_model(x, t), t, x, generator=gen)
        theirs = reference.step(toy_model(x_ref, t), t, x_ref, generator=gen_ref)
        torch.testing.assert_close(ours.pred_x0, theirs.pred_original_sample, **TOL)
        torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, **TOL)
        x, x_ref = ours.prev_sample, theirs.prev_sample
    assert torch.equal(gen.get_state(), gen_ref.get_state())


@pytest.mark.parametrize("kind", KINDS)
def test_q_sample_and_v_target_match_add_noise_and_get_velocity(diffusers, kind):
    reference = diffusers.DDPMScheduler(
        beta_schedule=KINDS[kind], beta_start=0.00085, beta_end=0.012
    )
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    mine = schedule(beta_schedule=kind)
    torch.testing.assert_close(
        mine.q_sample(x0, t, noise), reference.add_noise(x0, noise, t), **TOL
    )
    torch.testing.assert_close(
        mine.v_target(x0, noise, t), reference.get_velocity(x0, noise, t), **TOL
    )


def test_img2img_timesteps_match_pipeline_rule(diffusers):
    from diffusers import StableDiffusionImg2ImgPipeline

    for spacing, num_steps in [("leading", 1), ("leading", 7), ("leading", 50), ("trailing", 1000)]:
        sampler = DDIMSampler(schedule(), num_steps, spacing=spacing)
        reference = diffusers.DDIMScheduler(**SD, set_alpha_to_one=False, timestep_spacing=spacing)
        reference.set_timesteps(num_steps)
        # get_timesteps only reads pipeline.scheduler
        pipeline = SimpleNamespace(scheduler=reference)
        for strength in (0.0, 0.01, 0.3, 0.5, 0.75, 0.99, 1.0):
            expected, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
                pipeline, num_steps, strength, "cpu"
            )
            assert torch.equal(sampler.timesteps_for_strength(strength), expected), (
                spacing,
                num_steps,
                strength,
            )


def test_snr_matches_diffusers_training_utils(diffusers):
    from diffusers.training_utils import compute_snr

    reference = diffusers.DDPMScheduler(**SD)
    t = torch.arange(1000)
    snr = schedule().snr(t)
    torch.testing.assert_close(snr, compute_snr(reference, t), rtol=1e-6, atol=0)
    assert bool((snr[1:] < snr[:-1]).all()), "SNR must fall as t grows"


# ---------------------------------------------------------------------------------------- fixture
# (no diffusers needed)


def _load_fixture():
    with safe_open(FIXTURE, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, json.loads(f.metadata()["cases"])


def test_fixture_alphas_cumprod():
    tensors, _ = _load_fixture()
    for kind in KINDS:
        expected = tensors[f"alphas_cumprod.{kind}"]
        mine = schedule(beta_schedule=kind).alphas_cumprod
        torch.testing.assert_close(mine, expected, rtol=1e-6, atol=0)


def step_tolerance(sched, t, x, model_output, noise) -> float:
    """The absolute rounding bound of one sampler step, elementwise ops in float32.

    A step combines xₜ, the model output and the noise with coefficients of at most 1/√ᾱₜ
    (x̂₀ = (xₜ − √(1−ᾱₜ)·ε)/√ᾱₜ; the v formulas, the DDIM update and the DDPM posterior use
    coefficients ≤ 1). Each of the two implementations (the fixture's, diffusers', and minisd's)
    rounds about 8 times, each rounding of size ≤ ε·S with S = max(|xₜ| + |output| + |noise|)/√ᾱₜ,
    the largest magnitude the formulas combine. Where terms cancel, the result can be near 0 while
    the rounding is not: the error is absolute, of size ε·S, not relative to each element. The
    schedule's ᾱ may differ by up to 1e-6 ≈ 8ε relative (test_fixture_alphas_cumprod). Together:
    |ours − theirs| ≤ (8 + 8 + 8)·ε·S.
    """
    a = sched.alpha_bar(int(t), x).item()
    magnitude = (x.abs() + model_output.abs() + noise.abs()).max().item() / a**0.5
    return 24 * torch.finfo(torch.float32).eps * magnitude


def test_fixture_trajectories():
    """Every step of each fixture trajectory (made by diffusers: make_scheduler_fixture.py), started
    from the fixture's own xₜ, so that no step inherits the previous one's rounding."""
    tensors, cases = _load_fixture()
    assert len(cases) >= 4
    for name, case in cases.items():
        sched = schedule(case["prediction_type"])
        if case["sampler"] == "ddim":
            sampler = DDIMSampler(
                sched, case["num_steps"], eta=case["eta"], spacing=case["spacing"]
            )
        else:
            sampler = DDPMSampler(sched, case["num_steps"], spacing=case["spacing"])
        assert torch.equal(sampler.timesteps, tensors[f"{name}.timesteps"]), name
        x = tensors[f"{name}.x_T"]
        for i, t in enumerate(sampler.timesteps):
            output, noise = tensors[f"{name}.model_outputs"][i], tensors[f"{name}.noise"][i]
            out = sampler.step(output, t, x, variance_noise=noise)
            where = lambda message: f"{name}, step {i}: {message}"  # noqa: E731
            tol = dict(rtol=0, atol=step_tolerance(sched, t, x, output, noise))
            torch.testing.assert_close(out.pred_x0, tensors[f"{name}.pred_x0"][i], **tol, msg=where)
            torch.testing.assert_close(
                out.prev_sample, tensors[f"{name}.prev_samples"][i], **tol, msg=where
            )
            x = tensors[f"{name}.prev_samples"][i]


# ------------------------------------------------------------------------------------ properties
# the chapters teach


def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    sampler = DDIMSampler(schedule(), 20, eta=0.0)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    results = []
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        state = gen.get_state()
        x = x_T
        for t in sampler.timesteps:
            x = sampler.step(toy_model(x, t), t, x, generator=gen).prev_sample
        assert torch.equal(gen.get_state(), state)
        results.append(x)
    assert torch.equal(results[0], results[1])


def _bayes_posterior_closed_form(x0, x_t, a_t, a_prev):
    """q(x_prev | x_t, x0) ∝ q(x_t | x_prev) q(x_prev | x0), a product of two Gaussians in x_prev
    (float64).

    q(x_t | x_prev) = N(√α' x_prev, β'),  α' = ᾱ_t / ᾱ_prev, β' = 1 − α' → x_prev: precision α'/β'
    q(x_prev | x0)  = N(√ᾱ_prev x0, 1 − ᾱ_prev)
    Precisions add; the mean is the precision-weighted average of the two means.
    """
    alpha_step = a_t / a_prev
    beta_step = 1 - alpha_step
    precision = alpha_step / beta_step + 1 / (1 - a_prev)
    mean = (
        math.sqrt(alpha_step) * x_t / beta_step + math.sqrt(a_prev) * x0 / (1 - a_prev)
    ) / precision
    return mean, 1 / precision


@pytest.mark.parametrize("num_steps", [None, 50, 7])
def test_ddpm_posterior_is_bayes_of_two_gaussians(num_steps):
    sampler = DDPMSampler(schedule(), num_steps)
    alphas_cumprod = sampler.schedule.alphas_cumprod.double()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    timesteps = sampler.timesteps.tolist()
    for t, prev in zip(timesteps[:-1], timesteps[1:]):
        x_t = sampler.schedule.q_sample(
            x0, t, torch.randn(2, 3, generator=gen, dtype=torch.float64)
        )
        mean, variance = sampler.posterior(x0, x_t, t)
        expected_mean, expected_variance = _bayes_posterior_closed_form(
            x0, x_t, alphas_cumprod[t].item(), alphas_cumprod[prev].item()
        )
        torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-12)
        assert math.isclose(variance.item(), expected_variance, rel_tol=1e-9)
    # after the last timestep ᾱ_prev = 1: the posterior collapses onto x0 (variance clamped to
    # 1e-20)
    mean, variance = sampler.posterior(x0, x0 + 1.0, timesteps[-1])
    torch.testing.assert_close(mean, x0)
    assert variance.item() == pytest.approx(1e-20)


def test_ddpm_posterior_matches_numerical_bayes_on_a_grid():
    """The same posterior with no algebra at all: multiply the two densities on a fine 1-D grid and
    take moments."""
    sampler = DDPMSampler(schedule(), 50)
    alphas_cumprod = sampler.schedule.alphas_cumprod.double()
    for t, x0, x_t in [(981, 0.7, -0.4), (501, -1.2, 0.3), (41, 0.5, 0.55), (21, 0.0, 0.1)]:
        prev = sampler.previous_timestep(t)
        a_t, a_prev = alphas_cumprod[t].item(), alphas_cumprod[prev].item()
        alpha_step = a_t / a_prev
        # width of q(x_t | x_prev) as a function of x_prev
        lik_std = math.sqrt((1 - alpha_step) / alpha_step)
        grid = (
            torch.linspace(-8, 8, 400_001, dtype=torch.float64)
            * max(lik_std, math.sqrt(1 - a_prev))
            + x_t
        )
        log_density = -((x_t - math.sqrt(alpha_step) * grid) ** 2) / (2 * (1 - alpha_step)) - (
            (grid - math.sqrt(a_prev) * x0) ** 2
        ) / (2 * (1 - a_prev))
        weights = torch.softmax(log_density, dim=0)
        numeric_mean = (weights * grid).sum()
        numeric_variance = (weights * (grid - numeric_mean) ** 2).sum()
        as_tensor = lambda value: torch.tensor(value, dtype=torch.float64)  # noqa: E731
        mean, variance = sampler.posterior(as_tensor(x0), as_tensor(x_t), t)
        assert mean.item() == pytest.approx(numeric_mean.item(), rel=1e-6, abs=1e-8)
        assert variance.item() == pytest.approx(numeric_variance.item(), rel=1e-5)


def test_ddim_eta1_variance_is_ddpm_posterior_variance():
    sched = schedule()
    ddim, ddpm = DDIMSampler(sched, 50, eta=1.0), DDPMSampler(sched, 50)
    like = torch.zeros((), dtype=torch.float64)
    for t in ddim.timesteps[:-1]:  # the last step differs on purpose: DDIM ends at ᾱ₀, DDPM at 1
        _, variance = ddpm.posterior(like, like, t)
        assert ddim.sigma(t, like).item() ** 2 == pytest.approx(variance.item(), rel=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eps_v_x0_round_trip(prediction_type):
    sched = schedule(prediction_type)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(5, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 900, 999])
    x_t = sched.q_sample(x0, t, noise)
    x0_back, eps_back = sched.predict_x0_and_eps(sched.training_target(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_back, noise, rtol=0, atol=1e-10)
    # the two parameterisations describe the same (x0, ε): v computed from either side agrees
    v = sched.v_target(x0, noise, t)
    x0_from_v, eps_from_v = schedule("v_prediction").predict_x0_and_eps(v, x_t, t)
    x0_from_eps, _ = schedule("epsilon").predict_x0_and_eps(eps_from_v, x_t, t)
    torch.testing.assert_close(x0_from_v, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(x0_from_eps, x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_with_perfect_oracle_recovers_x0(prediction_type):
    sched = schedule(prediction_type)
    sampler = DDIMSampler(sched, 50, eta=0.0)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)

    def oracle(x_t, t):  # the true noise in x_t for this known x0, expressed as ε or v
        a = sched.alphas_cumprod[t].double()
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    x = sched.q_sample(x0, sampler.timesteps[0], noise)
    for t in sampler.timesteps:
        out = sampler.step(oracle(x, t), t, x)
        torch.testing.assert_close(out.pred_x0, x0, rtol=0, atol=1e-9)
        x = out.prev_sample
    # η = 0 keeps the same ε all the way down; SD's last step lands on ᾱ₀ (not 1), so a trace of it
    # remains
    torch.testing.assert_close(x, sched.q_sample(x0, 0, noise), rtol=0, atol=1e-9)


def test_img2img_strength_examples():
    sampler = DDIMSampler(schedule(), 50)
    assert sampler.timesteps_for_strength(1.0).tolist() == sampler.timesteps.tolist()
    assert sampler.timesteps_for_strength(0.3).tolist() == list(range(281, 0, -20))
    assert sampler.timesteps_for_strength(0.0).tolist() == []


# -------------------------------------------------------------------------------------------------
# bad input


def test_validation_messages():
    sched = schedule()
    with pytest.raises(ValueError, match="num_steps must be in \\[1, 1000\\], got 0"):
        DDIMSampler(sched, 0)
    with pytest.raises(ValueError, match="got 1001"):
        DDPMSampler(sched, 1001)
    with pytest.raises(ValueError, match="'leading', 'trailing', 'linspace'"):
        DDIMSampler(sched, 50, spacing="karras")
    with pytest.raises(ValueError, match="'scaled_linear', 'linear', 'cosine'"):
        ScheduleConfig(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="'epsilon', 'v_prediction', 'sample'"):
        ScheduleConfig(prediction_type="x0")
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta must be a number in \\[0, 1\\]"):
            DDIMSampler(sched, 50, eta=eta)
    with pytest.raises(ValueError, match="steps_offset=0 or spacing='trailing'"):
        DDIMSampler(sched, 1000)  # leading + steps_offset=1 would visit t = 1000
    with pytest.raises(ValueError, match="strength must be"):
        DDIMSampler(sched, 50).timesteps_for_strength(1.5)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="t=980 is not one of this sampler's timesteps"):
        DDIMSampler(sched, 50).step(x, 980, x)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        DDIMSampler(sched, 50, eta=1.0).step(
            x, 981, x, generator=torch.Generator(), variance_noise=x
        )
    with pytest.raises(ValueError, match="timesteps must be in \\[0, 999\\]"):
        sched.q_sample(x, torch.tensor([1000]), x)
    with pytest.raises(ValueError, match="same shape"):
        sched.q_sample(x, torch.tensor([3]), torch.zeros(1, 4, 8, 7))
    with pytest.raises(TypeError, match="integer timesteps"):
        sched.q_sample(x, torch.tensor([3.0]), x)


# -------------------------------------------------------------------------------------------------
# diffusers' own full-loop numbers (tests/schedulers/test_scheduler_*.py in diffusers' repository):
# their dummy sample, noise and model rebuilt here, their expected Σ|x| and mean |x| with their
# tolerances (1e-2 on the sum, 1e-3 on the mean). No diffusers needed.

from minisd.ddim import DDIMInversion  # noqa: E402
from minisd.samplers import make_sampler  # noqa: E402
from minisd.schedule import X0Limits  # noqa: E402


def dummy_sample_deter(flip=False):
    """diffusers' SchedulerCommonTest.dummy_sample_deter ([4, 3, 8, 8] ramp in [0, 1));
    flip=True gives dummy_noise_deter."""
    n = 4 * 3 * 8 * 8
    ramp = torch.arange(n).flip(-1) if flip else torch.arange(n)
    return (ramp.reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_model(x, t):
    """SchedulerCommonTest.dummy_model: sample · t / (t + 1)."""
    return x * t / (t + 1)


def linear_schedule(prediction_type="epsilon", T=1000, beta_start=0.0001, **options):
    config = ScheduleConfig(
        beta_schedule="linear", beta_start=beta_start, beta_end=0.02, num_train_timesteps=T,
        prediction_type=prediction_type, **options,
    )
    return NoiseSchedule(config)


def ddim_loop(prediction_type="epsilon", beta_start=0.0001, set_alpha_to_one=True, start=None):
    """test_scheduler_ddim.py: clip_sample=True, 10 steps, leading, steps_offset=0, η = 0."""
    sampler = DDIMSampler(
        linear_schedule(prediction_type, beta_start=beta_start), 10, steps_offset=0,
        set_alpha_to_one=set_alpha_to_one, limits=X0Limits(clip_sample=True),
    )
    x, timesteps = dummy_sample_deter(), sampler.timesteps
    if start is not None:
        timesteps = timesteps[start:]
        x = sampler.add_noise(x, dummy_sample_deter(flip=True), timesteps[0])
    for t in timesteps:
        x = sampler.step(dummy_model(x, t), t, x).prev_sample
    return x


def ddpm_loop(prediction_type="epsilon", start=None):
    """test_scheduler_ddpm.py: clip_sample=True, all 1000 steps, noise from torch.manual_seed(0)."""
    sampler = DDPMSampler(linear_schedule(prediction_type), limits=X0Limits(clip_sample=True))
    generator = torch.manual_seed(0)
    x, timesteps = dummy_sample_deter(), sampler.timesteps
    if start is not None:
        timesteps = timesteps[start:]
        x = sampler.add_noise(x, dummy_sample_deter(flip=True), timesteps[0])
    for t in timesteps.tolist():
        x = sampler.step(dummy_model(x, t), t, x, generator=generator).prev_sample
    return x


def sigma_loop(name, prediction_type="epsilon", karras=False, start=None):
    """test_scheduler_{euler,euler_ancestral,heun}.py: T = 1100, 10 steps, linspace. Their loop
    passes the *scaled* sample on to `step` (x ← scale_model_input(x, t)), which we repeat."""
    sampler = make_sampler(name, linear_schedule(prediction_type, T=1100), 10, karras=karras)
    generator = torch.manual_seed(0)
    x = dummy_sample_deter() * float(sampler.init_noise_sigma)
    timesteps = sampler.timesteps.tolist()
    if start is not None:
        timesteps = timesteps[start * sampler.order :]
        x = sampler.add_noise(x, dummy_sample_deter(flip=True), timesteps[0])
    for t in timesteps:
        x = sampler.scale_model_input(x, t)
        output = dummy_model(x, torch.tensor(t))
        x = sampler.step(output, t, x, generator=generator if sampler.stochastic else None)
        x = x.prev_sample
    return x


def dpm_loop(prediction_type="epsilon", karras=False, limits=None):
    """test_scheduler_dpm_multi.py: linear, 10 steps, final_sigmas_type="sigma_min",
    lower_order_final=False."""
    sampler = make_sampler(
        "dpmpp_2m", linear_schedule(prediction_type), 10, karras=karras,
        final_sigma="sigma_min", lower_order_final=False, limits=limits,
    )
    x = dummy_sample_deter()
    for t in sampler.timesteps.tolist():
        x = sampler.step(dummy_model(x, torch.tensor(int(t))), t, x).prev_sample
    return x


THRESHOLD = X0Limits(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5)
DIFFUSERS_FULL_LOOPS = {  # case: (run, expected sum or None, expected mean)
    "ddim no noise": (lambda: ddim_loop(), 172.0067, 0.223967),
    "ddim v_prediction": (lambda: ddim_loop("v_prediction"), 52.5302, 0.0684),
    "ddim set_alpha_to_one": (lambda: ddim_loop(beta_start=0.01), 149.8295, 0.1951),
    "ddim no set_alpha_to_one": (
        lambda: ddim_loop(beta_start=0.01, set_alpha_to_one=False), 149.0784, 0.1941
    ),
    "ddim with noise (img2img)": (lambda: ddim_loop(start=8), 354.5418, 0.4616),
    "ddpm no noise": (lambda: ddpm_loop(), 258.9606, 0.3372),
    "ddpm v_prediction": (lambda: ddpm_loop("v_prediction"), 202.0296, 0.2631),
    "ddpm with noise": (lambda: ddpm_loop(start=998), 387.9466, 0.5051),
    "euler no noise": (lambda: sigma_loop("euler"), 10.0807, 0.0131),
    "euler v_prediction": (lambda: sigma_loop("euler", "v_prediction"), 0.0002, 2.2676e-06),
    "euler karras": (lambda: sigma_loop("euler", karras=True), 124.52299499511719, 0.1621393),
    "euler_a no noise": (lambda: sigma_loop("euler_a"), 152.3192, 0.1983),
    "euler_a v_prediction": (lambda: sigma_loop("euler_a", "v_prediction"), 108.4439, 0.1412),
    "euler_a with noise": (lambda: sigma_loop("euler_a", start=8), 56163.0508, 73.1290),
    "heun no noise": (lambda: sigma_loop("heun"), 0.1233, 0.0002),
    "heun v_prediction": (lambda: sigma_loop("heun", "v_prediction"), 4.6934e-07, 6.1112e-10),
    "heun karras": (lambda: sigma_loop("heun", karras=True), 0.00015, 1.9869554535034695e-07),
    "dpmpp_2m no noise": (lambda: dpm_loop(), None, 0.3301),
    "dpmpp_2m v_prediction": (lambda: dpm_loop("v_prediction"), None, 0.2251),
    "dpmpp_2m karras v_prediction": (lambda: dpm_loop("v_prediction", True), None, 0.2096),
    "dpmpp_2m thresholding": (lambda: dpm_loop(limits=THRESHOLD), None, 1.1364),
}


@pytest.mark.parametrize("case", DIFFUSERS_FULL_LOOPS)
def test_diffusers_full_loop_numbers(case):
    run, expected_sum, expected_mean = DIFFUSERS_FULL_LOOPS[case]
    x = run()
    if expected_sum is not None:
        assert abs(x.abs().sum().item() - expected_sum) < 1e-2, (case, x.abs().sum().item())
    assert abs(x.abs().mean().item() - expected_mean) < 1e-3, (case, x.abs().mean().item())


# -------------------------------------------------------------------------------------------------
# the DDIM / DDPM options, step by step against diffusers

DDIM_OPTIONS = {
    "clip_sample range 0.5": dict(clip_sample=True, clip_sample_range=0.5),
    "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0),
    "set_alpha_to_one": dict(set_alpha_to_one=True),
    "linspace (diffusers prev rule)": dict(timestep_spacing="linspace"),
    "trailing N=7 (diffusers prev rule)": dict(timestep_spacing="trailing", num_steps=7),
    "zero SNR + trailing, v": dict(
        rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
    ),
    "prediction sample": dict(prediction_type="sample"),
}
LIMIT_KEYS = ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
              "sample_max_value")


def _split_options(options):
    options = dict(options)
    num_steps = options.pop("num_steps", 10)
    limits = X0Limits(**{k: options[k] for k in LIMIT_KEYS if k in options})
    sched = dict(
        prediction_type=options.get("prediction_type", "epsilon"),
        rescale_betas_zero_snr=options.get("rescale_betas_zero_snr", False),
    )
    return num_steps, limits, sched, options


@pytest.mark.parametrize("case", DDIM_OPTIONS)
def test_ddim_options_match_diffusers(diffusers, case):
    num_steps, limits, sched, options = _split_options(DDIM_OPTIONS[case])
    spacing = options.get("timestep_spacing", "leading")
    reference = diffusers.DDIMScheduler(
        **{**SD, "set_alpha_to_one": False, "timestep_spacing": spacing, **options}
    )
    reference.set_timesteps(num_steps)
    sampler = DDIMSampler(
        schedule(**sched), num_steps, eta=0.5, spacing=spacing,
        set_alpha_to_one=options.get("set_alpha_to_one", False), limits=limits,
    )
    assert torch.equal(sampler.timesteps, reference.timesteps)
    gen = torch.Generator().manual_seed(0)
    x = x_ref = torch.randn(2, 4, 8, 8, generator=gen)
    for t in sampler.timesteps:
        z = torch.randn(x.shape, generator=gen)
        ours = sampler.step(toy_model(x, t), t, x, variance_noise=z)
        theirs = reference.step(toy_model(x_ref, t), t, x_ref, eta=0.5, variance_noise=z)
        torch.testing.assert_close(ours.pred_x0, theirs.pred_original_sample, **TOL, msg=case)
        torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, **TOL, msg=case)
        x, x_ref = ours.prev_sample, theirs.prev_sample


DDPM_OPTIONS = {
    "fixed_small_log": dict(variance_type="fixed_small_log"),
    "fixed_large": dict(variance_type="fixed_large"),
    "learned": dict(variance_type="learned"),
    "learned_range": dict(variance_type="learned_range"),
    "custom timesteps": dict(timesteps=[900, 701, 555, 300, 87, 10, 0]),
    "thresholding, prediction sample": dict(thresholding=True, prediction_type="sample"),
    "clip_sample": dict(clip_sample=True),
}


@pytest.mark.parametrize("case", DDPM_OPTIONS)
def test_ddpm_options_match_diffusers(diffusers, case):
    num_steps, limits, sched, options = _split_options(DDPM_OPTIONS[case])
    custom = options.pop("timesteps", None)
    reference = diffusers.DDPMScheduler(**{**SD, **options})
    if custom is None:
        reference.set_timesteps(num_steps)
    else:
        reference.set_timesteps(timesteps=custom)
    variance_type = options.get("variance_type", "fixed_small")
    sampler = DDPMSampler(
        schedule(**sched), None if custom else num_steps, timesteps=custom,
        variance_type=variance_type, limits=limits,
    )
    assert torch.equal(sampler.timesteps, reference.timesteps)
    x = x_ref = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    gen, gen_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in sampler.timesteps:
        output = toy_model(x, t)
        if variance_type.startswith("learned"):  # a second half of channels: the variance
            extra = torch.rand(x.shape, generator=torch.Generator().manual_seed(int(t)))
            extra = extra * 0.01 if variance_type == "learned" else extra * 2 - 1
            output = torch.cat([output, extra], dim=1)
        ours = sampler.step(output, t, x, generator=gen)
        theirs = reference.step(output, t, x_ref, generator=gen_ref)
        torch.testing.assert_close(ours.pred_x0, theirs.pred_original_sample, **TOL, msg=case)
        torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, **TOL, msg=case)
        x, x_ref = ours.prev_sample, theirs.prev_sample


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_inversion_matches_diffusers(diffusers, spacing, prediction_type):
    reference = diffusers.DDIMInverseScheduler(
        **SD, set_alpha_to_one=False, prediction_type=prediction_type, timestep_spacing=spacing
    )
    reference.set_timesteps(10)
    inversion = DDIMInversion(schedule(prediction_type), 10, spacing=spacing)
    assert torch.equal(inversion.timesteps, reference.timesteps)
    x = x_ref = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    for t in inversion.timesteps:
        ours = inversion.step(toy_model(x, t), t, x)
        theirs = reference.step(toy_model(x_ref, t), t, x_ref)
        torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, **TOL)
        x, x_ref = ours.prev_sample, theirs.prev_sample


def test_ddim_inversion_round_trip_with_an_oracle():
    """With the true ε of a single x₀, inverting then sampling returns x₀ (both directions are
    exact for a point mass)."""
    sched = schedule()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def eps_of(x, t):
        a = sched.alphas_cumprod[int(t)].double()
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    inversion = DDIMInversion(sched, 20, set_alpha_to_one=True)
    x = x0.clone()
    for t in inversion.timesteps:  # the oracle knows x₀, so evaluating at t is exact
        prev = max(int(t) - inversion.stride, 0)
        x = inversion.step(eps_of(x, prev) if int(t) >= inversion.stride else 0 * x, t, x)
        x = x.prev_sample
    sampler = DDIMSampler(sched, 20, set_alpha_to_one=True)
    for t in sampler.timesteps:
        x = sampler.step(eps_of(x, t), t, x).prev_sample
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-8)
