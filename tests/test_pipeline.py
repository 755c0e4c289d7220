"""The generation pipeline against diffusers' Stable Diffusion pipelines, and the properties it
promises.

Parity: one set of random tiny weights goes into diffusers/transformers modules and (through
minisd's keymap) into minisd. diffusers' pipelines get the prompt embeddings computed by the
transformers text encoder from minisd's token ids (`prompt_embeds=`), so no transformers tokenizer
is needed; minisd tokenizes and encodes on its own. Both draw their random numbers from CPU
generators with the same seed, so the comparison covers the noise, the VAE posterior sample for
img2img/inpainting, guidance, the sampler and the masks.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from PIL import Image

import minisd
from minisd.ddim import DDIMSampler
from minisd.ensemble import ModelEnsemble
from minisd.attention_maps import record_cross_attention
from minisd.pipeline import noise_schedule
from minisd.prompts import parse_emphasis, split_composition
from reference_models import (
    diffusers_unet,
    diffusers_vae,
    minisd_from_references,
    rel_err,
    transformers_clip,
)

SIZE = 32  # tiny: VAE downscale 2 -> 16×16 latents
TOL = 1e-4


def tiny_config(prediction_type="epsilon", in_channels=4):
    cfg = minisd.tiny()
    return dataclasses.replace(
        cfg,
        prediction_type=prediction_type,
        unet=dataclasses.replace(cfg.unet, in_channels=in_channels),
    )


def build_references(cfg, seed=0):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    torch.manual_seed(seed)
    unet, vae, text = diffusers_unet(cfg), diffusers_vae(cfg), transformers_clip(cfg)
    return minisd_from_references(cfg, unet, vae, text), (unet, vae, text)


@pytest.fixture(scope="module")
def eps_refs():
    return build_references(tiny_config())


@pytest.fixture(scope="module")
def sd(eps_refs):
    return eps_refs[0]


def diffusers_pipeline(kind, refs, prediction_type="epsilon", scheduler="ddim"):
    import diffusers

    sd, (unet, vae, text) = refs
    common = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )
    if scheduler == "ddim":
        sched = diffusers.DDIMScheduler(set_alpha_to_one=False, **common)
    else:
        sched = diffusers.DDPMScheduler(variance_type="fixed_small", **common)
    cls = {
        "txt2img": diffusers.StableDiffusionPipeline,
        "img2img": diffusers.StableDiffusionImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
    }[kind]
    pipe = cls(
        vae=vae,
        text_encoder=text,
        tokenizer=None,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_embeds(sd, text_model, prompt, negative):
    with torch.no_grad():
        cond = text_model(sd.tokenizer([prompt])).last_hidden_state
        uncond = text_model(sd.tokenizer([negative])).last_hidden_state
    return dict(prompt_embeds=cond, negative_prompt_embeds=uncond)


def random_image(seed, size=SIZE):
    rng = np.random.default_rng(seed)
    smooth = rng.random((size // 4, size // 4, 3))
    return Image.fromarray((np.kron(smooth, np.ones((4, 4, 1))) * 255).astype(np.uint8))


def box_mask(size=SIZE):
    mask = np.zeros((size, size), dtype=np.uint8)
    # odd edges: the mask straddles latent pixels, so its resizing matters
    mask[5:21, 9:27] = 255
    return Image.fromarray(mask, mode="L")


# -------------------------------------------------------------------------------------------------
# parity with diffusers


@pytest.mark.parametrize(
    "prediction_type,sampler,eta",
    [
        ("epsilon", "ddim", 0.0),
        ("epsilon", "ddim", 0.5),
        ("v_prediction", "ddim", 0.0),
        ("epsilon", "ddpm", 0.0),
    ],
)
def test_txt2img_matches_diffusers(prediction_type, sampler, eta, eps_refs):
    refs = (
        eps_refs if prediction_type == "epsilon" else build_references(tiny_config(prediction_type))
    )
    sd, (_, _, text) = refs
    prompt, negative = "a red circle on the left", "blurry"
    pipe = diffusers_pipeline("txt2img", refs, prediction_type, sampler)
    kwargs = dict(eta=eta) if sampler == "ddim" else {}
    expected = pipe(
        **reference_embeds(sd, text, prompt, negative),
        num_inference_steps=10,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(42),
        output_type="latent",
        **kwargs,
    ).images
    got = sd.generate(
        prompt,
        negative_prompt=negative,
        steps=10,
        guidance_scale=7.5,
        sampler=sampler,
        eta=eta,
        seed=42,
        output_type="latent",
    )
    assert rel_err(got, expected) <= TOL


def test_txt2img_given_latents_and_decoded_images_match_diffusers(eps_refs):
    sd, (_, _, text) = eps_refs
    start = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    pipe = diffusers_pipeline("txt2img", eps_refs)
    embeds = reference_embeds(sd, text, "a square", "")
    embeds = {k: v.repeat(2, 1, 1) for k, v in embeds.items()}
    expected = pipe(
        **embeds, num_inference_steps=10, height=SIZE, width=SIZE, latents=start, output_type="pt"
    ).images
    got = sd.generate(["a square", "a square"], steps=10, latents=start, output_type="tensor")
    assert got.shape == (2, 3, SIZE, SIZE)
    assert rel_err(got, expected) <= TOL


def test_img2img_matches_diffusers(eps_refs):
    sd, (_, _, text) = eps_refs
    image = random_image(1)
    pipe = diffusers_pipeline("img2img", eps_refs)
    expected = pipe(
        **reference_embeds(sd, text, "a blue square", ""),
        image=image,
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images
    got = sd.generate(
        "a blue square",
        init_image=image,
        strength=0.6,
        steps=10,
        guidance_scale=5.0,
        seed=7,
        output_type="latent",
    )
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("in_channels,strength", [(9, 1.0), (9, 0.7), (4, 1.0), (4, 0.7)])
def test_inpainting_matches_diffusers(in_channels, strength, eps_refs):
    refs = (
        eps_refs
        if in_channels == 4
        else build_references(tiny_config(in_channels=in_channels), seed=1)
    )
    sd, (_, _, text) = refs
    image, mask = random_image(2), box_mask()
    pipe = diffusers_pipeline("inpaint", refs)
    expected = pipe(
        **reference_embeds(sd, text, "a green triangle", ""),
        image=image,
        mask_image=mask,
        height=SIZE,
        width=SIZE,
        strength=strength,
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(11),
        output_type="latent",
    ).images
    got = sd.generate(
        "a green triangle",
        init_image=image,
        mask=mask,
        strength=strength,
        steps=10,
        seed=11,
        output_type="latent",
    )
    assert rel_err(got, expected) <= TOL


# -------------------------------------------------------------------------------------------------
# properties


def test_same_seed_same_image_other_seed_other_image(sd):
    a = sd.generate("a circle", steps=3, seed=5, output_type="tensor")
    b = sd.generate("a circle", steps=3, seed=5, output_type="tensor")
    c = sd.generate("a circle", steps=3, seed=6, output_type="tensor")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_image_seeds_do_not_depend_on_the_batch(sd):
    """Image i's noise comes from its own seed: "a square" is the same image alone or in a batch.

    Tolerance, from how the rounding arises: the two runs draw the same noise and differ only in
    the networks' batch size (UNet rows 4 vs 2), for which the CPU's matrix kernels may split their
    sums differently: float32 rounding, whose size depends on the CPU (AVX2, AVX-512) and threads.
    It is an absolute error, of the size of the latents' largest values (~10 here), not relative
    to each element: elements near 0 get errors as large as any other. So it is measured, not
    guessed: the same runs with the networks in float64 (rounding 2^29 times finer; the sampler
    stays float32, elementwise, the same in both runs) give each float32 run's rounding error, and
    two runs that draw the same noise differ by at most the sum of their errors. The property
    itself is checked in float64 too, where that error all but vanishes.
    """

    def square(model):
        common = dict(steps=3, sampler="ddpm", output_type="latent", height=16, width=16)
        batch = model.generate(["a circle", "a square"], seed=[5, 9], **common)
        alone = model.generate("a square", seed=[9], **common)
        return batch[1:], alone

    batch32, alone32 = square(sd)
    batch64, alone64 = square(copy.deepcopy(sd).double())
    rounding = (batch32 - batch64).abs().max() + (alone32 - alone64).abs().max()
    assert rounding < 1e-3 * batch32.abs().max()  # float32 rounding, not another computation
    assert (batch64 - alone64).abs().max() <= rounding / 16
    assert (batch32 - alone32).abs().max() <= rounding


def manual_ddim(sd, prompt, steps, start, guidance):
    """The sampling loop written out with the model's parts, for comparison with generate."""
    sampler = DDIMSampler(noise_schedule(sd), steps)
    with torch.no_grad():
        cond = sd.text_encoder(sd.tokenizer([prompt]))
        x = start.clone()
        for t in sampler.timesteps.tolist():
            x = sampler.step(guidance(x, t, cond), t, x).prev_sample
    return x


def test_guidance_scale_one_is_the_conditional_prediction_and_skips_the_uncond_batch(sd):
    start = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    batch_sizes = []
    handle = sd.unet.register_forward_pre_hook(
        lambda module, inputs: batch_sizes.append(inputs[0].shape[0])
    )
    try:
        got = sd.generate(
            "a circle", steps=4, guidance_scale=1.0, latents=start, output_type="latent"
        )
    finally:
        handle.remove()
    expected = manual_ddim(sd, "a circle", 4, start, lambda x, t, cond: sd.unet(x, t, cond))
    assert batch_sizes == [1] * 4
    assert rel_err(got, expected) <= 1e-6


def test_composition_formula(sd):
    """'A AND B :0.25' follows ε = ε_u + s·Σ wᵢ(εᵢ − ε_u), computed here from separate UNet
    calls."""
    start = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    def composed(x, t, _):
        eps = {p: sd.unet(x, t, sd.text_encoder(sd.tokenizer([p]))) for p in ("", "a cat", "a hat")}
        return eps[""] + 6.0 * ((eps["a cat"] - eps[""]) + 0.25 * (eps["a hat"] - eps[""]))

    got = sd.generate(
        "a cat AND a hat :0.25", steps=3, guidance_scale=6.0, latents=start, output_type="latent"
    )
    expected = manual_ddim(sd, "", 3, start, composed)
    assert rel_err(got, expected) <= 1e-5


def test_composition_with_one_part_equals_plain_guidance(sd):
    plain = sd.generate("a cat", steps=3, seed=2, output_type="latent")
    halves = sd.generate("a cat :0.5 AND a cat :0.5", steps=3, seed=2, output_type="latent")
    zero_weight_part = sd.generate("a cat AND a hat :0", steps=3, seed=2, output_type="latent")
    assert rel_err(halves, plain) <= 1e-5 and rel_err(zero_weight_part, plain) <= 1e-5
    assert split_composition("a cat AND a hat :0.5") == [("a cat", 1.0), ("a hat", 0.5)]
    assert split_composition("a cat and (a hat:1.2)") == [("a cat and (a hat:1.2)", 1.0)]


def test_ensemble(sd, eps_refs):
    alone = sd.generate("a cat", steps=3, seed=4, output_type="latent")
    assert torch.equal(
        ModelEnsemble([sd], weights=[1.0]).generate("a cat", steps=3, seed=4, output_type="latent"),
        alone,
    )
    other = build_references(tiny_config(), seed=5)[0]
    other_alone = other.generate("a cat", steps=3, seed=4, output_type="latent")
    assert (
        rel_err(
            ModelEnsemble([sd, other], [0.0, 1.0]).generate(
                "a cat", steps=3, seed=4, output_type="latent"
            ),
            other_alone,
        )
        <= 1e-6
    )
    # The per-step mix is linear: an ensemble of a model with itself is that model.
    assert (
        rel_err(
            ModelEnsemble([sd, sd]).generate("a cat", steps=3, seed=4, output_type="latent"), alone
        )
        <= 1e-5
    )
    with pytest.raises(ValueError, match="latent_scale"):
        ModelEnsemble(
            [sd, minisd.StableDiffusion(dataclasses.replace(tiny_config(), latent_scale=0.5))]
        )
    with pytest.raises(ValueError, match="2 models but 1 weights"):
        ModelEnsemble([sd, other], weights=[1.0])


def test_fully_masked_inpaint_equals_txt2img(sd):
    start = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    txt2img = sd.generate("a cat", steps=4, latents=start, output_type="latent")
    everything = Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8), mode="L")
    inpainted = sd.generate(
        "a cat",
        steps=4,
        latents=start,
        init_image=random_image(3),
        mask=everything,
        output_type="latent",
    )
    assert torch.equal(inpainted, txt2img)


def test_empty_mask_returns_the_input(sd):
    image = random_image(4)
    nothing = Image.fromarray(np.zeros((SIZE, SIZE), np.uint8), mode="L")
    out = sd.generate(
        "a cat", steps=4, seed=3, init_image=image, mask=nothing, output_type="tensor"
    )
    assert torch.equal(
        out, torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    )
    # In latent space the result is the image's own latents: the VAE posterior sample drawn first
    # from the seed.
    latents = sd.generate(
        "a cat", steps=4, seed=3, init_image=image, mask=nothing, output_type="latent"
    )
    with torch.no_grad():
        posterior = sd.vae.encode(
            torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
        )
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    assert (
        rel_err(latents, sd.config.latent_scale * (posterior.mean + posterior.std * noise)) <= 1e-6
    )


def test_callback_sees_every_step_with_diffusers_timesteps(sd):
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
    )
    reference.set_timesteps(7)
    calls = []
    sd.generate(
        "a cat",
        steps=7,
        seed=0,
        output_type="latent",
        callback=lambda i, t, x, x0: calls.append((i, t, x.shape, x0.shape)),
    )
    assert [c[:2] for c in calls] == list(enumerate(reference.timesteps.tolist()))
    assert all(c[2] == c[3] == (1, 4, 16, 16) for c in calls)
    calls.clear()
    sd.generate(
        "a cat",
        steps=10,
        seed=0,
        init_image=random_image(0),
        strength=0.6,
        output_type="latent",
        callback=lambda i, t, x, x0: calls.append(t),
    )
    reference.set_timesteps(10)
    assert calls == reference.timesteps[4:].tolist()


def test_cross_attention_maps(sd):
    with record_cross_attention(sd) as maps:
        sd.generate(["a red circle", "a cat AND a hat"], steps=2, seed=0, output_type="latent")
    first = maps.per_token(image=0)
    assert first.shape == (77, 16, 16)
    assert torch.allclose(first.sum(0), torch.ones(16, 16), atol=1e-5)
    assert maps.tokens(image=0)[:5] == [
        "<|startoftext|>",
        "a</w>",
        "red</w>",
        "circle</w>",
        "<|endoftext|>",
    ]
    assert maps.tokens(image=1, part=1)[1:3] == ["a</w>", "hat</w>"]
    assert all(
        layer.probs_hook is None for layer in sd.unet.modules() if getattr(layer, "is_cross", False)
    )


def test_emphasis_parsing():
    assert parse_emphasis("a (red:1.3) circle") == [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]
    assert parse_emphasis("((big)) [dull]") == [
        ("big", pytest.approx(1.21)),
        (" ", 1.0),
        ("dull", pytest.approx(1 / 1.1)),
    ]
    assert parse_emphasis(r"a \(literal\) smile :)") == [("a (literal) smile :)", 1.0)]
    # ':0.5)' closes the innermost '(' even across an open '['; the unclosed '[' then applies to the
    # rest.
    assert parse_emphasis("(a [b:0.5) c") == [
        ("a ", 0.5),
        ("b", pytest.approx(0.5 / 1.1)),
        (" c", pytest.approx(1 / 1.1)),
    ]
    assert parse_emphasis("no markup") == [("no markup", 1.0)]


@pytest.mark.parametrize("bias", [0.0, 0.05])
def test_emphasis_scales_the_tokens_and_keeps_the_mean(sd, bias):
    """z' = z ⊙ w · mean(z) / mean(z ⊙ w), in float64, then one rounding to float32.

    bias 0: the tiny model's final LayerNorm has no bias, so every token's vector has mean 0 and
    mean(z) is float rounding (~1e-8 of mean|z|, of either sign, or exactly 0, depending on the
    CPU's summation order): there is no mean to keep, and z ⊙ w is returned as it is (dividing one
    rounding error by another gave a random scale, or "mean zero" on an AVX2 CPU). bias 0.05: a
    real mean, kept. Tolerance: the expected value is the same float64 formula; the result is it
    rounded once to float32 (relative error ≤ 2^-24 per element), so rtol = 2^-23 with atol 0.
    """
    from minisd.prompts import encode_prompts

    model = copy.deepcopy(sd)
    with torch.no_grad():
        model.text_encoder.final_norm.bias.fill_(bias)
    plain, plain_ids = encode_prompts(model, ["a red circle"])
    weighted, ids = encode_prompts(model, ["a (red:1.5) circle"])
    assert torch.equal(ids, plain_ids)
    w = torch.ones(77, dtype=torch.float64)
    w[2] = 1.5  # BOS, a, red, …
    z = plain[0].double()
    expected = z * w[:, None]
    if bias:
        expected = expected * z.mean() / expected.mean()
    else:
        assert abs(z.mean()) < 1e-6 * z.abs().mean()  # zero up to rounding
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(weighted[0].double(), expected, rtol=eps, atol=0)
    # the mean is kept, to the same per-element rounding: |Δmean| ≤ 2^-24 · mean|z'|
    mean_error = abs(weighted[0].double().mean() - z.mean())
    assert mean_error <= eps * weighted[0].double().abs().mean()
    literal, literal_ids = encode_prompts(model, ["a (red:1.5) circle"], weighting=False)
    assert torch.equal(literal_ids, model.tokenizer(["a (red:1.5) circle"]))


def test_template(sd):
    a = sd.generate(
        "cat", template="a photo of {}, detailed", steps=2, seed=1, output_type="latent"
    )
    b = sd.generate("a photo of cat, detailed", steps=2, seed=1, output_type="latent")
    assert torch.equal(a, b)


def test_output_types(sd):
    images = sd.generate(["a", "b"], steps=2, seed=1, num_images=2)
    assert len(images) == 4 and all(
        isinstance(i, Image.Image) and i.size == (SIZE, SIZE) for i in images
    )
    tensor = sd.generate("a", steps=2, seed=1, output_type="tensor", height=16, width=24)
    assert tensor.shape == (1, 3, 16, 24) and 0 <= tensor.min() and tensor.max() <= 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=30), "height must be a multiple of 8"),
        (dict(width=0), "width must be >= 1"),
        (dict(steps=0), "steps must be in"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(strength=1.5, init_image="x"), "strength must be in"),
        (dict(sampler="lms"), "unknown sampler"),
        (dict(eta=2.0), "eta must be in"),
        (dict(sampler="ddpm", eta=0.5), "DDIM sampler only"),
        (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
        (dict(prompt=3), "prompt must be a string"),
        (dict(prompt=["a", 2]), "prompt must be a string"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt has 3 entries"),
        (dict(output_type="numpy"), "unknown output_type"),
        (dict(mask=Image.new("L", (SIZE, SIZE))), "needs the image"),
        (
            dict(init_image=Image.new("RGB", (32, 32)), mask=Image.new("L", (16, 32))),
            "must have the same size",
        ),
        (dict(init_image=Image.new("RGB", (30, 30))), "height must be a multiple of 8"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), "latents must be a tensor of shape"),
        (dict(seed=-1), "seed must be"),
        (dict(seed=[1, 2]), "2 seeds/generators for 1 images"),
        (dict(template="no slot"), "template must be a string containing"),
    ],
)
def test_bad_arguments_give_clear_errors(sd, kwargs, message):
    kwargs = {"prompt": "a cat", "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        sd.generate(**kwargs)


def test_unreadable_init_image(sd, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        sd.generate("a", steps=2, init_image=tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd.generate("a", steps=2, init_image=tmp_path / "missing.png")


def test_plain_cpu_convolutions_only_for_small_latents_and_restored_afterwards():
    """The CPU speed switch of the denoising loop: on for tiny latents, off for SD-sized ones,
    always restored, and the convolution it selects computes the same thing as oneDNN's (to float
    rounding)."""
    from minisd.pipeline import plain_convolutions_for_small_latents

    assert torch.backends.mkldnn.enabled
    with plain_convolutions_for_small_latents(torch.zeros(2, 4, 8, 8)):
        assert not torch.backends.mkldnn.enabled
        x, w = torch.randn(2, 64, 8, 8), torch.randn(64, 64, 3, 3)
        plain = F.conv2d(x, w, padding=1)
    assert torch.backends.mkldnn.enabled
    reference = F.conv2d(x, w, padding=1)
    # sums of 576 products: rounding only
    assert float((plain - reference).abs().max() / reference.abs().max()) < 1e-6
    with plain_convolutions_for_small_latents(torch.zeros(1, 4, 64, 64)):
        assert torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError):
        with plain_convolutions_for_small_latents(torch.zeros(1, 4, 8, 8)):
            raise RuntimeError("an error inside the loop")
    assert torch.backends.mkldnn.enabled


def test_denoise_steps_yields_the_loop_of_generate(sd):
    """The generator is the loop `generate` runs: same latents at every step, same final x, and
    x̂₀ of the last step is the sampler's estimate; settings as an object equal keywords."""
    kwargs = dict(steps=4, seed=3, guidance_scale=5.0, output_type="latent")
    seen = []
    final = sd.generate("a red circle", callback=lambda i, t, x, x0: seen.append(x), **kwargs)
    steps = list(sd.generate_steps("a red circle", steps=4, seed=3, guidance_scale=5.0))
    assert [s.index for s in steps] == [0, 1, 2, 3]
    assert all(torch.equal(s.latents, x) for s, x in zip(steps, seen))
    assert torch.equal(steps[-1].latents, final)
    settings = minisd.SamplingSettings(steps=4, seed=3, guidance_scale=5.0)
    assert torch.equal(sd.generate("a red circle", settings=settings, output_type="latent"), final)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['stepz'\\]"):
        sd.generate("a red circle", stepz=4)
    with pytest.raises(TypeError, match="settings must be a SamplingSettings"):
        sd.generate("a red circle", "", 4)
