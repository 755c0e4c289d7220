"""The fast path computes the same function as the readable path; tiled decoding ≈ plain decoding;
the benchmark refuses bad settings clearly and produces its table.

CPU tests use the tiny preset with perturbed weights (so no norm sits at its default 1/0 and nothing
is trivially equal). Fused and sliced attention and channels_last change only the order of
floating-point operations, so they must agree with the readable path to fp32 rounding (≤ 1e-5
relative). GPU tests (compile, CUDA graphs, float16) skip without a GPU.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import minisd
from minisd.tools import bench
from minisd.__main__ import main as cli
from minisd.attention import attention_backend, attention_layers, get_attention_backend
from minisd.train.lora import add_lora, lora_layers, remove_lora
from minisd.tools.fastpath import CUDAGraphCall, FastPath, slow_down, speed_up
from minisd.tools.tiled_vae import WholeImageGroupNorm, decode_tiles, tiled_decode, _axis_tiles

TOL = 1e-5
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def tiny_model(seed=0) -> minisd.StableDiffusion:
    torch.manual_seed(seed)
    sd = minisd.StableDiffusion(minisd.tiny()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sd.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return sd


@pytest.fixture
def sd():
    model = tiny_model()
    yield model
    slow_down(model)


def unet_inputs(sd, size=8, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([437]),
            torch.randn(batch, 77, sd.config.unet.context_dim, generator=g))


# ---------------------------------------------------------------- fast path == readable path

def test_fused_and_sliced_attention_match_the_readable_path(sd):
    x, t, ctx = unet_inputs(sd)
    with torch.no_grad():
        readable = sd.unet(x, t, ctx)
        # 3 does not divide batch·heads = 4: the last slice is short
        with attention_backend(sd, "math", slice_size=3):
            sliced = sd.unet(x, t, ctx)
        with attention_backend(sd, "fused"):
            fused = sd.unet(x, t, ctx)
    assert rel_err(fused, readable) < TOL
    assert rel_err(sliced, readable) < TOL


def test_channels_last_matches_and_slow_down_restores(sd):
    x, t, ctx = unet_inputs(sd)
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    names = {k: v.clone() for k, v in sd.state_dict().items()}
    with torch.no_grad(), attention_backend(sd, "math"):
        ref_unet, ref_image = sd.unet(x, t, ctx), sd.vae.decode(z)
    fast = speed_up(sd, attention="fused", channels_last=True)
    assert get_attention_backend(sd) == "fused" and sd.fast_path is fast
    assert sd.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_err(sd.unet(x, t, ctx), ref_unet) < TOL
        assert rel_err(sd.vae.decode(z), ref_image) < TOL
    # same parameter names and values: the fast path changes how, never what
    assert {k: torch.equal(v, names[k]) for k, v in sd.state_dict().items()} == {
        k: True for k in names
    }
    slow_down(sd)
    assert get_attention_backend(sd) == "math" and sd.fast_path is None
    assert sd.unet.conv_in.weight.is_contiguous()
    assert "forward" not in sd.unet.__dict__ and "decode" not in sd.vae.__dict__


def test_generate_on_the_fast_path_matches_the_readable_path(sd):
    # guidance 1 (no unconditional rows): a scale of 7.5 would multiply the rounding differences by
    # 7.5 per step
    kwargs = dict(steps=2, seed=0, output_type="tensor", guidance_scale=1.0)
    with attention_backend(sd, "math"):
        readable = sd.generate("a red circle", **kwargs)
    speed_up(sd, attention="fused", channels_last=True)
    fast = sd.generate("a red circle", **kwargs)
    assert (fast - readable).abs().max() < TOL


def test_speed_up_refuses_bad_switches(sd):
    with pytest.raises(ValueError, match="attention must be 'fused' or 'math'"):
        speed_up(sd, attention="flash")
    with pytest.raises(ValueError, match="records CUDA graphs itself"):
        speed_up(sd, compile=True, compile_mode="reduce-overhead", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        speed_up(sd, cuda_graphs=True)
    with pytest.raises(ValueError, match="tile_overlap"):
        speed_up(sd, tiled_decode=True, tile_size=8, tile_overlap=8)
    with pytest.raises(ValueError, match="dtype"):
        speed_up(sd, dtype=torch.int8)
    assert "fused+fuse_projections+channels_last+compile" == FastPath(compile=True).describe()
    assert "fused+compile" == FastPath(compile=True, fuse_projections=False,
                                       channels_last=False).describe()


def test_fused_projections_are_the_same_weights_and_the_same_function(sd, tmp_path):
    """fuse_projections: one product x[W_q; W_k; W_v]ᵀ instead of three. The three blocks are the
    same numbers, so the outputs differ only by the summation order of the matrix product (fp32
    rounding, TOL); the parameters become views (no second copy), the state dict keeps its names,
    training (grad on) takes the readable branch so gradients reach every W, the file written
    afterwards is the same, and slow_down gives each projection its own memory back."""
    x, t, ctx = unet_inputs(sd)
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in sd.state_dict().items()}
    objects = [id(p) for p in sd.parameters()]
    with torch.no_grad():
        ref_unet, ref_image = sd.unet(x, t, ctx), sd.vae.decode(z)
    speed_up(sd, attention="math", channels_last=False, fuse_projections=True)
    assert [id(p) for p in sd.parameters()] == objects  # an optimizer's parameters stay the model's
    layers = attention_layers(sd)
    # the fused product replaces to_k's own call (both kinds of layer) while there is no gradient
    to_k_calls = []
    for layer in layers:
        layer.to_k.register_forward_hook(lambda *_: to_k_calls.append(1))
    with torch.no_grad():
        sd.unet(x, t, ctx)
    assert not to_k_calls
    assert layers and all(layer.fused_weight is not None for layer in layers)
    for layer in layers:
        first = layer.to_k if layer.is_cross else layer.to_q
        assert first.weight.data_ptr() == layer.fused_weight.data_ptr()  # a view, not a copy
        width = layer.to_v.weight.shape[0]
        assert torch.equal(layer.fused_weight[-width:], layer.to_v.weight)
    after = sd.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert rel_err(sd.unet(x, t, ctx), ref_unet) < TOL
        assert rel_err(sd.vae.decode(z), ref_image) < TOL
    # with gradients: the readable branch, and every projection gets its gradient
    sd.unet(x, t, ctx).square().mean().backward()
    assert to_k_calls  # the readable line ran
    assert all(layer.to_q.weight.grad is not None and layer.to_k.weight.grad is not None
               for layer in attention_layers(sd.unet))
    sd.zero_grad(set_to_none=True)
    path = tmp_path / "fused.safetensors"
    minisd.save(sd, path)  # views into one matrix: written as separate tensors
    reloaded = minisd.load(path).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in before.items())
    slow_down(sd)
    assert [id(p) for p in sd.parameters()] == objects
    assert all(layer.fused_weight is None for layer in layers)
    pointers = [layer.to_k.weight.data_ptr() for layer in layers]
    assert all(p != layer.to_q.weight.data_ptr() for p, layer in zip(pointers, layers))


def test_fused_projections_never_go_stale(sd):
    """Conversions (.double()), copies (deepcopy) and load_state_dict(assign=True) give parameters
    and fused matrix separate memory; the layer rebuilds the matrix, so later changes to the
    parameters (a load, an optimizer step) reach the fused product too: fused (no grad) and readable
    (grad on) outputs agree to fp rounding (TOL) after each."""
    x, t, ctx = unet_inputs(sd)
    speed_up(sd, attention="math", channels_last=False, fuse_projections=True)

    def fused_vs_readable(model, dtype=torch.float32):
        inputs = (x.to(dtype), t, ctx.to(dtype))
        with torch.no_grad():
            fused = model.unet(*inputs)
        return rel_err(fused, model.unet(*inputs).detach())

    # a no-op conversion or an in-place load leaves the matrix where it is (a CUDA graph recorded
    # on the fast path reads the weights at their addresses)
    addresses = [layer.fused_weight.data_ptr() for layer in attention_layers(sd)]
    sd.to("cpu", torch.float32)
    sd.load_state_dict(sd.state_dict())
    assert [layer.fused_weight.data_ptr() for layer in attention_layers(sd)] == addresses

    def sgd_step(model, dtype):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model.unet(x.to(dtype), t, ctx.to(dtype)).square().mean().backward()
        optimizer.step()

    sd.double()
    sgd_step(sd, torch.float64)  # changes the parameters in place after a conversion
    assert fused_vs_readable(sd, torch.float64) < TOL
    copied = copy.deepcopy(sd)
    sgd_step(copied, torch.float64)
    assert fused_vs_readable(copied, torch.float64) < TOL
    sd.load_state_dict(tiny_model(seed=1).double().state_dict())
    assert fused_vs_readable(sd, torch.float64) < TOL
    sd.float()
    sd.load_state_dict(tiny_model(seed=3).state_dict(), assign=True)
    assert fused_vs_readable(sd) < TOL
    sgd_step(sd, torch.float32)
    assert fused_vs_readable(sd) < TOL


def test_lora_wrapped_after_fusing_still_runs(sd):
    """A LoRA adapter added after speed_up wraps to_q/to_k/to_v: the fused matrix is then not the
    whole projection, so the layer must take the readable branch (the adapter's delta counts)."""
    x, t, ctx = unet_inputs(sd)
    speed_up(sd, attention="math", channels_last=False, fuse_projections=True)
    add_lora(sd.unet, rank=2)
    with torch.no_grad():
        for layer in lora_layers(sd.unet).values():
            layer.up.normal_(0, 0.5)  # a non-zero adapter
        fused_on = sd.unet(x, t, ctx)
        remove_lora(sd.unet, merge=True)  # the delta merged into the (view) weights in place
        merged = sd.unet(x, t, ctx)
    slow_down(sd)
    with torch.no_grad():
        readable = sd.unet(x, t, ctx)
    assert rel_err(fused_on, readable) < TOL and rel_err(merged, readable) < TOL


def test_cuda_graph_call_falls_back_where_it_cannot_record(sd):
    """On the CPU, or with gradients on, the wrapper simply calls the function."""
    x, t, ctx = unet_inputs(sd)
    wrapped = CUDAGraphCall(sd.unet.forward, next(sd.unet.parameters()))
    with torch.no_grad():
        assert torch.equal(wrapped(x, t, ctx), sd.unet(x, t, ctx))
    assert not wrapped.recordings


# ---------------------------------------------------------------- tiled VAE decoding


def test_single_tile_decode_is_the_plain_decode(sd):
    for size in (12, 16):
        z = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            assert torch.equal(tiled_decode(sd.vae, z, tile_size=16, overlap=4), sd.vae.decode(z))


def test_tiles_with_whole_image_statistics_reproduce_the_plain_decode(sd):
    """With the exact GroupNorm statistics given, only the tiling itself could differ, and it must
    not: every pixel that gets weight lies ≥ overlap/4 = 8 latents inside its tile, beyond the
    7-latent reach of the tiny decoder's tiled convolutions (4 convs at latent resolution, 1 + 4 + 1
    at twice that)."""
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(3))
    decoder = sd.vae.decoder
    exact = {}

    def record(norm, inputs, output):
        groups = inputs[0].reshape(inputs[0].shape[0], norm.num_groups, -1)
        exact[norm] = (groups.mean(-1), groups.var(-1, unbiased=False))

    layers = [m for level in decoder.levels for m in level.modules()] + [decoder.norm_out]
    norms = [m for m in layers if isinstance(m, torch.nn.GroupNorm)]
    handles = [m.register_forward_hook(record) for m in norms]
    with torch.no_grad():
        plain = sd.vae.decode(z)
    for handle in handles:
        handle.remove()
    tiles = [_axis_tiles(48, 40, 32)] * 2
    assert len(tiles[0]) == 2
    with torch.no_grad(), WholeImageGroupNorm(layers) as hooks:
        hooks.stats = exact
        h = decoder.middle(decoder.conv_in(sd.vae.post_quant_conv(z)))
        tiled = decode_tiles(decoder, h, tiles, sd.vae.downscale, hooks)
    assert rel_err(tiled, plain) < TOL


def test_tiled_decode_is_close_to_the_plain_decode(sd):
    """With statistics measured over the tiles (2 sweeps), a 48² latent in 2 × 2 tiles of 40² stays
    within a few percent of the plain decode, and a second sweep is closer than tile-local
    statistics (1 sweep)."""
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = sd.vae.decode(z)
    one, two = (tiled_decode(sd.vae, z, tile_size=40, overlap=32, sweeps=s) for s in (1, 2))
    assert (two - plain).abs().mean() / plain.abs().mean() < 0.05
    assert rel_err(two, plain) < rel_err(one, plain)
    with pytest.raises(ValueError, match="overlap"):
        tiled_decode(sd.vae, z, tile_size=8, overlap=8)


def test_generate_uses_tiled_decoding_when_switched_on(sd):
    kwargs = dict(steps=2, seed=0, output_type="tensor")
    plain = sd.generate("a square", **kwargs)
    speed_up(
        sd, attention="math", channels_last=False, tiled_decode=True, tile_size=16, tile_overlap=4
    )
    # 32² image = 16² latents: a single tile
    assert torch.equal(sd.generate("a square", **kwargs), plain)


# ---------------------------------------------------------------- the benchmark command


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "tpu"], "is not a device name"),
        (["--device", "meta"], "runs on cpu or cuda devices"),
        (["--size", "500"], "multiples of 8"),
        (["--size", "520", "--preset", "sd1"], "multiples of 64"),
        (["--device", "cpu", "--dtype", "float16"], "float16 needs a GPU"),
        (["--dtype", "float8"], "is not one of float32, float16, bfloat16"),
        (["--variants", "minisd,tensorrt"], "unknown tensorrt"),
        (["--preset", "sd3"], "is not one of"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--device", "cpu", "--cuda-graphs"], "needs a CUDA device"),
    ],
)
def test_bench_refuses_bad_settings(argv, message, capsys, monkeypatch):
    # never build sd1 here
    monkeypatch.setattr(bench, "build_minisd", lambda name, device, dtype: tiny_model())
    assert cli(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_bench_refuses_cuda_without_a_gpu(capsys):
    assert cli(["bench", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_bench_reports_out_of_memory_with_the_options(capsys, monkeypatch):
    def out_of_memory(case, variant):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench, "run_variant", out_of_memory)
    assert (
        cli(
            ["bench", "--device", "cpu", "--preset", "tiny", "--variants", "minisd", "--steps", "1"]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "out of GPU memory" in out and "--attention-slicing" in out and "--tiled-decode" in out
    assert "Traceback" not in out


def test_quick_cpu_bench_on_the_tiny_preset(tmp_path, capsys):
    variants = "minisd,minisd-fast"
    try:
        import diffusers  # noqa: F401

        variants += ",diffusers"
    except ImportError:
        pass
    out_file = tmp_path / "bench.json"
    assert (
        cli(
            [
                "bench",
                "--device",
                "cpu",
                "--preset",
                "tiny",
                "--steps",
                "2",
                "--iters",
                "1",
                "--images",
                "0",
                "--variants",
                variants,
                "--json",
                str(out_file),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| model | size | dtype | variant | UNet ms |" in printed
    rows = json.loads(out_file.read_text())["rows"]
    assert [r["variant"] for r in rows] == [v for v in bench.ORDER if v in variants.split(",")]
    for r in rows:
        assert r["unet_ms"] > 0 and r["image_s"] > 0 and r["first_image_s"] > 0
        # every variant computes the same function as minisd's eager path, on the same weights
        if "unet_rel_err_vs_minisd" in r:
            assert r["unet_rel_err_vs_minisd"] < TOL and r["image_max_abs_diff_vs_minisd"] < TOL
    if "diffusers" in variants:
        assert "minisd / diffusers: UNet it/s" in printed


# ---------------------------------------------------------------- GPU: compile, CUDA graphs,
# float16


@cuda
def test_compiled_cuda_graph_unet_matches_eager_in_float16():
    sd = tiny_model().to("cuda", torch.float16)
    x, t, ctx = (v.to("cuda") for v in unet_inputs(sd))
    x, ctx = x.half(), ctx.half()
    try:
        with torch.no_grad(), attention_backend(sd, "fused"):
            eager = [sd.unet(x * s, t, ctx).float() for s in (1.0, 0.5)]
        speed_up(sd, compile=True, cuda_graphs=True)
        with torch.no_grad():
            # second call replays with new inputs
            fast = [sd.unet(x * s, t, ctx).float() for s in (1.0, 0.5)]
        assert len(sd.unet.forward.recordings) == 1
        for a, b in zip(fast, eager):
            assert rel_err(a, b) < 1e-2  # float16: ~1e-3 per op, kernels fused in another order
    finally:
        slow_down(sd)


@cuda
def test_generate_on_the_gpu_fast_path_matches_eager():
    sd = tiny_model().to("cuda", torch.float16)
    kwargs = dict(steps=4, seed=0, output_type="tensor")
    try:
        with attention_backend(sd, "fused"):
            eager = sd.generate("a red circle", **kwargs)
        speed_up(sd, compile=True, cuda_graphs=True)
        fast = sd.generate("a red circle", **kwargs)
        again = sd.generate("a red circle", **kwargs)  # replays the UNet's and decoder's graphs
        assert (fast - eager).abs().max() < 2e-2  # images in [0, 1], float16 networks
        assert torch.equal(again, fast)  # a replay is the same kernels on the same numbers
        unet_graphs, decoder_graphs = sd.unet.forward, sd.vae.decoder.forward
        assert len(decoder_graphs.recordings) == 1 and len(unet_graphs.recordings) == 1
        # the decoder's recording was made in the UNet's pool: it reuses the UNet's scratch
        recorded_pools = {rec[1].pool() for g in (unet_graphs, decoder_graphs)
                          for rec in g.recordings.values()}
        assert len(recorded_pools) == 1
    finally:
        slow_down(sd)
