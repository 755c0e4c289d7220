"""Every network of minisd against the reference implementations, with weights moved by minisd's own
key table.

Relative error max|a − b| / max|b| must stay at fp32 rounding (≤ 1e-5). Three sources of reference
outputs:
  * the stored fixture (always; needs only minisd's own requirements),
  * diffusers / transformers live, at the tiny preset and an SD 2-flavoured tiny config,
  * diffusers / transformers live at the full SD 1 and SD 2 sizes, on an 8×8 latent to keep the
    CPU time low.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import minisd
from minisd.attention import Attention, attention_backend
from minisd.weights.keymap import from_diffusers
from reference_models import (
    diffusers_unet,
    diffusers_vae,
    minisd_from_references,
    rel_err,
    transformers_clip,
)

FIXTURE = Path(__file__).parent / "fixtures" / "components_reference.safetensors"
TOL = 1e-5


def perturbed(module, seed):
    """Move every weight off its default init (norms at exactly 1, zero-initialised layers) so
    nothing is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def sd2_flavoured_tiny() -> minisd.SDConfig:
    """The tiny preset with every SD 2 switch on: fixed head size, linear projections, GELU,
    penultimate layer."""
    cfg = minisd.tiny()
    return dataclasses.replace(
        cfg,
        unet=dataclasses.replace(cfg.unet, num_heads=None, head_dim=16, linear_projection=True),
        text=dataclasses.replace(
            cfg.text, layers=3, use_layers=2, activation="gelu", pad_token_id=0
        ),
        prediction_type="v_prediction",
    )


# ---------------------------------------------------------------- stored fixture (no reference
# library needed)


def test_against_stored_reference_outputs():
    with safe_open(str(FIXTURE), framework="pt") as f:
        cfg = minisd.SDConfig.from_json(f.metadata()["config"])
        data = {k: f.get_tensor(k) for k in f.keys()}
    weights = {
        part: {k.split(".", 2)[2]: v for k, v in data.items() if k.startswith(f"weights.{part}.")}
        for part in ("unet", "vae", "text_encoder")
    }
    sd = minisd.StableDiffusion(cfg)
    mapped = from_diffusers(
        unet=weights["unet"], vae=weights["vae"], text_encoder=weights["text_encoder"]
    )
    sd = minisd.from_state_dict(cfg, mapped, source="fixture")
    with torch.no_grad():
        assert (
            rel_err(
                sd.unet(data["input.x"], data["input.t"], data["input.context"]),
                data["output.unet"],
            )
            < TOL
        )
        post = sd.vae.encode(data["input.images"])
        assert rel_err(post.mean, data["output.vae_mean"]) < TOL
        assert rel_err(post.logvar, data["output.vae_logvar"]) < TOL
        assert rel_err(sd.vae.decode(post.mean), data["output.vae_decode"]) < TOL
        assert rel_err(sd.text_encoder(data["input.ids"]), data["output.text"]) < TOL


# ---------------------------------------------------------------- live references at small sizes


@pytest.fixture(scope="module", params=["sd1-like", "sd2-like"])
def tiny_pair(request):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = minisd.tiny() if request.param == "sd1-like" else sd2_flavoured_tiny()
    unet, vae, text = (
        perturbed(m, i)
        for i, m in enumerate((diffusers_unet(cfg), diffusers_vae(cfg), transformers_clip(cfg)))
    )
    return cfg, minisd_from_references(cfg, unet, vae, text), unet, vae, text


@torch.no_grad()
def test_unet_matches_diffusers(tiny_pair):
    cfg, sd, unet, _, _ = tiny_pair
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, 12, generator=g)  # non-square on purpose: catches transposed reshapes
    ctx = torch.randn(3, 77, cfg.unet.context_dim, generator=g)
    t = torch.tensor([0, 500, 999])
    assert rel_err(sd.unet(x, t, ctx), unet(x, t, ctx).sample) < TOL
    # A scalar timestep is broadcast over the batch, as diffusers does.
    assert rel_err(sd.unet(x, 250, ctx), unet(x, 250, ctx).sample) < TOL


@torch.no_grad()
def test_vae_matches_diffusers(tiny_pair):
    _, sd, _, vae, _ = tiny_pair
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 24, 16, generator=g) * 2 - 1
    ours, ref = sd.vae.encode(images), vae.encode(images).latent_dist
    assert rel_err(ours.mean, ref.mean) < TOL
    assert rel_err(ours.logvar, ref.logvar) < TOL
    assert rel_err(ours.kl(), ref.kl()) < TOL
    # Same generator state, same reparameterised sample.
    assert (
        rel_err(
            ours.sample(torch.Generator().manual_seed(3)),
            ref.sample(torch.Generator().manual_seed(3)),
        )
        < TOL
    )
    assert rel_err(sd.vae.decode(ref.mean), vae.decode(ref.mean).sample) < TOL


@torch.no_grad()
def test_text_encoder_matches_transformers(tiny_pair):
    cfg, sd, _, _, text = tiny_pair
    ids = torch.randint(0, cfg.text.vocab_size, (3, 77), generator=torch.Generator().manual_seed(4))
    assert rel_err(sd.text_encoder(ids), text(ids).last_hidden_state) < TOL


@torch.no_grad()
def test_causal_mask_means_later_tokens_do_not_change_earlier_outputs(tiny_pair):
    cfg, sd, *_ = tiny_pair
    ids = torch.randint(0, cfg.text.vocab_size, (1, 77), generator=torch.Generator().manual_seed(5))
    changed = ids.clone()
    changed[0, 40:] = (changed[0, 40:] + 1) % cfg.text.vocab_size
    a, b = sd.text_encoder(ids), sd.text_encoder(changed)
    assert torch.equal(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 40:], b[:, 40:])


# ---------------------------------------------------------------- full sizes, small inputs


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@torch.no_grad()
def test_full_size_models_match_references(family):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = minisd.sd1() if family == "sd1" else minisd.sd2()
    unet, vae, text = diffusers_unet(cfg), diffusers_vae(cfg), transformers_clip(cfg)
    sd = minisd_from_references(cfg, unet, vae, text)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cfg.unet.context_dim, generator=g)
    assert (
        rel_err(sd.unet(x, torch.tensor([321]), ctx), unet(x, torch.tensor([321]), ctx).sample)
        < TOL
    )
    images = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ours, ref = sd.vae.encode(images), vae.encode(images).latent_dist
    assert rel_err(ours.mean, ref.mean) < TOL
    assert rel_err(sd.vae.decode(ref.mean), vae.decode(ref.mean).sample) < TOL
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    assert rel_err(sd.text_encoder(ids), text(ids).last_hidden_state) < TOL


def test_parameter_counts_of_the_official_architectures():
    """Counts from the published models (see GUIDE): a wrong width or a missing block changes
    them."""
    counts = {}
    for name, cfg in (("sd1", minisd.sd1()), ("sd2", minisd.sd2())):
        with torch.device("meta"):
            sd = minisd.StableDiffusion(cfg)
        counts[name] = {
            p: sum(x.numel() for x in getattr(sd, p).parameters())
            for p in ("unet", "vae", "text_encoder")
        }
    assert counts["sd1"]["unet"] == 859_520_964 and counts["sd2"]["unet"] == 865_910_724
    assert counts["sd1"]["vae"] == counts["sd2"]["vae"] == 83_653_863
    assert counts["sd1"]["text_encoder"] == 123_060_480
    # SD 2 keeps OpenCLIP's 24th layer for round trips but runs 23: the 23 layers that run hold
    # 340,387,840.
    layer = counts["sd2"]["text_encoder"] - 340_387_840
    # qkv+out (4d²+4d) + MLP (8d²+5d) + 2 LayerNorms (4d)
    assert layer == 12 * 1024**2 + 13 * 1024


# ---------------------------------------------------------------- attention fast paths


@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_equals_the_written_out_formula(causal):
    torch.manual_seed(0)
    attn = Attention(64, heads=4, head_dim=16, context_dim=None if causal else 48, qkv_bias=causal)
    x = torch.randn(2, 10, 64)
    ctx = None if causal else torch.randn(2, 7, 48)
    mask = minisd.attention.causal_mask(10) if causal else None
    reference = attn(x, ctx, mask)
    with attention_backend(attn, "fused"):
        fused = attn(x, ctx, mask)
    with attention_backend(attn, "math", slice_size=3):
        sliced = attn(x, ctx, mask)
    assert rel_err(fused, reference) < TOL
    assert rel_err(sliced, reference) < TOL


def test_attention_is_softmax_of_scaled_scores():
    """Check the written-out path against the equation computed independently with plain matrix
    products."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    out, probs = minisd.attention.attention_math(q, k, v)
    expected_probs = torch.softmax(q[0, 0] @ k[0, 0].T / 8**0.5, dim=-1)
    assert torch.allclose(probs[0, 0], expected_probs, atol=1e-6)
    assert torch.allclose(out[0, 0], expected_probs @ v[0, 0], atol=1e-6)


def test_probs_hook_sees_the_attention_maps():
    attn = Attention(16, heads=2, head_dim=8, context_dim=12)
    seen = []
    attn.probs_hook = seen.append
    attn(torch.randn(3, 9, 16), torch.randn(3, 5, 12))
    assert seen[0].shape == (3, 2, 9, 5)
    assert torch.allclose(seen[0].sum(-1), torch.ones(3, 2, 9))


# ---------------------------------------------------------------- clear errors at module entry


def test_bad_shapes_are_named_at_the_module_entry():
    sd = minisd.StableDiffusion(minisd.tiny())
    ctx = torch.randn(1, 77, 32)
    with pytest.raises(ValueError, match=r"4 channels.*got shape \(1, 3, 16, 16\)"):
        sd.unet(torch.randn(1, 3, 16, 16), 1, ctx)
    with pytest.raises(ValueError, match="multiples of 4"):
        sd.unet(torch.randn(1, 4, 10, 16), 1, ctx)
    with pytest.raises(ValueError, match=r"32 channels in dim 2.*\(1, 77, 768\)"):
        sd.unet(torch.randn(1, 4, 16, 16), 1, torch.randn(1, 77, 768))
    with pytest.raises(ValueError, match="batch"):
        sd.unet(torch.randn(2, 4, 16, 16), 1, ctx)
    with pytest.raises(ValueError, match="timesteps"):
        sd.unet(torch.randn(2, 4, 16, 16), torch.tensor([1, 2, 3]), torch.randn(2, 77, 32))
    with pytest.raises(ValueError, match=r"3 channels.*got shape \(1, 4, 32, 32\)"):
        sd.vae.encode(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"4 dims\), got shape \(3, 32, 32\)"):
        sd.vae.encode(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="latent_channels"):
        sd.vae.decode(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="at most 77 tokens"):
        sd.text_encoder(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        sd.text_encoder(torch.zeros(1, 77))
    with pytest.raises(ValueError, match="token ids must lie"):
        sd.text_encoder(torch.full((1, 77), 49408))
    ids = torch.zeros(1, 77, dtype=torch.long)
    ids[0, 3], ids[0, 9] = -2, 49410  # the message names the true extremes
    with pytest.raises(
        ValueError, match=r"token ids must lie in \[0, 49408\), got min -2, max 49410"
    ):
        sd.text_encoder(ids)


def test_token_id_check_does_not_break_a_compiled_graph():
    """The id range check reads values back to the host; under torch.compile it must step aside, not
    split the graph."""
    encoder = minisd.StableDiffusion(minisd.tiny()).text_encoder.eval()
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    # fullgraph: any graph break raises
    compiled = torch.compile(encoder, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(ids), encoder(ids))


def test_config_that_does_not_fit_is_refused():
    cfg = minisd.tiny()
    with pytest.raises(ValueError, match="context_dim"):
        dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, context_dim=64))
    with pytest.raises(ValueError, match="prediction_type"):
        dataclasses.replace(cfg, prediction_type="x0")


def test_save_load_round_trip(tmp_path):
    sd = perturbed(minisd.StableDiffusion(minisd.tiny()), 0)
    sd.extras = {"betas": torch.linspace(0, 1, 5)}
    minisd.save(sd, tmp_path / "m.safetensors")
    back = minisd.load(tmp_path / "m.safetensors")
    assert back.config == sd.config
    for (k, a), (k2, b) in zip(sd.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(back.extras["betas"], sd.extras["betas"])
    # no temporary file left behind
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_file_has_the_mode_a_plain_open_gives(tmp_path, umask):
    """The save goes through a temporary file and a rename; the file must not keep a private
    temporary-file mode."""
    old = os.umask(umask)
    try:
        minisd.save(minisd.StableDiffusion(minisd.tiny()), tmp_path / "m.safetensors")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask
