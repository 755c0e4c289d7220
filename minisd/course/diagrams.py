"""The book's diagrams, drawn with matplotlib so that they live in the repository and regenerate.

Each chapter opens with the diagram of what it builds: `draw(chapter)` returns it (a matplotlib
Figure), `CHAPTER_DIAGRAMS` says which is which. A diagram is boxes (`Box`: a label at a centre,
in axis units where the figure is `width` × `height`) joined by arrows (`Arrow`), drawn by
`flowchart`.
The shapes printed on the boxes are SD 1's at 512 × 512 (latents 4 × 64 × 64, text 77 × 768).
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

# One colour per kind of thing, the same in every diagram.
COLOURS = {
    "text": "#fde9c9",      # words, tokens, text vectors
    "net": "#cfe3f7",       # a network (learned weights)
    "op": "#e8e8e8",        # a fixed operation (no weights)
    "latent": "#d8f0d2",    # latents, noise, images
    "sampler": "#f6d3e4",   # the scheduler / sampler
}


@dataclass
class Box:
    name: str
    label: str
    x: float
    y: float
    kind: str = "op"
    w: float = 1.6
    h: float = 0.7


@dataclass
class Arrow:
    start: str
    end: str
    label: str = ""
    bend: float = 0.0          # curvature: 0 straight, ±0.3 a gentle arc
    style: str = "-|>"
    dashed: bool = False


def flowchart(boxes, arrows, width: float, height: float, title: str = "", note: str = ""):
    """Draw boxes and arrows on a blank canvas of width × height axis units; return the Figure."""
    fig, ax = plt.subplots(figsize=(width * 0.9, height * 0.9))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    by_name = {}
    for box in boxes:
        patch = FancyBboxPatch((box.x - box.w / 2, box.y - box.h / 2), box.w, box.h,
                               boxstyle="round,pad=0.02,rounding_size=0.12", linewidth=1.0,
                               facecolor=COLOURS[box.kind], edgecolor="#555555")
        ax.add_patch(patch)
        ax.text(box.x, box.y, box.label, ha="center", va="center", fontsize=8.5)
        by_name[box.name] = patch
    for arrow in arrows:
        a, b = by_name[arrow.start], by_name[arrow.end]
        patch = FancyArrowPatch(posA=_centre(a), posB=_centre(b), patchA=a, patchB=b,
                                arrowstyle=arrow.style, mutation_scale=12, linewidth=1.1,
                                color="#333333", linestyle="--" if arrow.dashed else "-",
                                connectionstyle=f"arc3,rad={arrow.bend}", shrinkA=2, shrinkB=2)
        ax.add_patch(patch)
        if arrow.label:
            (x0, y0), (x1, y1) = _edge(a, _centre(b)), _edge(b, _centre(a))
            mx, my = (x0 + x1) / 2, (y0 + y1) / 2
            # an arc bulges sideways by about rad × length / 2, to the right of the direction
            dx, dy = x1 - x0, y1 - y0
            mx, my = mx + arrow.bend * dy / 2, my - arrow.bend * dx / 2
            ax.text(mx, my + 0.12, arrow.label, ha="center", va="bottom", fontsize=7.5,
                    color="#333333", bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    if title:
        ax.set_title(title, fontsize=10)
    if note:
        ax.text(width / 2, 0.15, note, ha="center", va="bottom", fontsize=7.5, color="#555555")
    fig.tight_layout()
    return fig


def _centre(patch):
    return (patch.get_x() + patch.get_width() / 2, patch.get_y() + patch.get_height() / 2)


def _edge(patch, towards):
    """Where the line from the patch's centre towards a point leaves the patch's rectangle."""
    (cx, cy), (tx, ty) = _centre(patch), towards
    dx, dy = tx - cx, ty - cy
    half_w, half_h = patch.get_width() / 2, patch.get_height() / 2
    scale = min(half_w / abs(dx) if dx else float("inf"), half_h / abs(dy) if dy else float("inf"))
    scale = min(scale, 1.0)
    return cx + dx * scale, cy + dy * scale


def latent_diffusion():
    """Chapter 0 / 9: text → tokens → CLIP → UNet ⟲ scheduler → VAE decoder → image."""
    boxes = [
        Box("prompt", '"a red circle\non the left"', 1.1, 3.2, "text", w=1.8),
        Box("tok", "tokenizer\n(BPE)", 3.3, 3.2, "op"),
        Box("clip", "CLIP text\nencoder", 5.5, 3.2, "net"),
        Box("noise", "noise $x_T$\n4×64×64", 1.1, 1.3, "latent", w=1.8),
        Box("unet", "UNet\n$\\varepsilon_\\theta(x_t, t, c)$", 5.5, 1.3, "net", w=1.9),
        Box("sched", "scheduler\n(DDPM / DDIM)", 8.7, 1.3, "sampler", w=1.8),
        Box("vae", "VAE decoder", 11.0, 1.3, "net"),
        Box("image", "image\n3×512×512", 11.0, 3.2, "latent"),
    ]
    arrows = [
        Arrow("prompt", "tok"), Arrow("tok", "clip", "77 ids"),
        Arrow("clip", "unet", "context $c$ 77×768"),
        Arrow("noise", "unet", "$x_T$"),
        Arrow("unet", "sched", "$\\hat\\varepsilon$", bend=-0.35),
        Arrow("sched", "unet", "$x_{t-1}$  (repeat T times)", bend=-0.35),
        Arrow("sched", "vae", "$x_0$"), Arrow("vae", "image"),
    ]
    return flowchart(boxes, arrows, 12.1, 4.0, "Latent diffusion: the whole of Stable Diffusion")


def attention():
    """Chapter 1: scaled dot-product attention."""
    boxes = [
        Box("x", "queries from $x$\n$[n, d]$", 1.1, 3.0, "latent", w=1.8),
        Box("ctx", "keys, values from\n$x$ or context $c$", 1.1, 1.0, "text", w=1.8),
        Box("q", "$Q = xW_q$", 3.5, 3.0, "net"),
        Box("k", "$K = cW_k$", 3.5, 1.8, "net"),
        Box("v", "$V = cW_v$", 3.5, 0.6, "net"),
        Box("s", "$S = QK^\\top/\\sqrt{d}$\n$[n, m]$", 5.9, 2.4, "op", w=1.9),
        Box("a", "softmax\nover keys", 8.0, 2.4, "op"),
        Box("o", "$O = AV$\n$[n, d]$", 8.0, 0.6, "op"),
        Box("out", "$W_o$ → out", 10.1, 0.6, "net"),
    ]
    arrows = [Arrow("x", "q"), Arrow("ctx", "k"), Arrow("ctx", "v"), Arrow("q", "s"),
              Arrow("k", "s"), Arrow("s", "a"), Arrow("a", "o", "A"), Arrow("v", "o"),
              Arrow("o", "out")]
    return flowchart(boxes, arrows, 11.2, 3.7, "Attention, per head (h heads run side by side)")


def transformer_block():
    """Chapter 2: the spatial transformer around the UNet's transformer block."""
    boxes = [
        Box("in", "$h$  [C, H, W]", 0.9, 2.0, "latent", w=1.4),
        Box("proj", "GroupNorm\nproj_in → tokens\n[HW, C]", 2.8, 2.0, "net", w=1.7, h=0.9),
        Box("sa", "LayerNorm\nself-attention", 4.9, 2.0, "net", w=1.7),
        Box("ca", "LayerNorm\ncross-attention", 7.0, 2.0, "net", w=1.7),
        Box("ff", "LayerNorm\nGEGLU MLP", 9.1, 2.0, "net", w=1.7),
        Box("out", "proj_out\n+ $h$", 11.1, 2.0, "net", w=1.4),
        Box("ctx", "text context $c$\n[77, 768]", 7.0, 0.5, "text", w=1.9),
    ]
    arrows = [Arrow("in", "proj"), Arrow("proj", "sa"), Arrow("sa", "ca", "+"),
              Arrow("ca", "ff", "+"), Arrow("ff", "out", "+"), Arrow("ctx", "ca", "K, V"),
              Arrow("in", "out", "residual", bend=-0.15, dashed=True)]
    return flowchart(boxes, arrows, 12.0, 3.9,
                     "The transformer block: x += attn1(norm x); x += attn2(norm x, c); "
                     "x += ff(norm x)")


def resnet_block():
    """Chapter 3: the ResNet block with the timestep injected between its two convolutions."""
    boxes = [
        Box("x", "$x$ [C, H, W]", 0.9, 2.6, "latent", w=1.4),
        Box("n1", "GroupNorm\nSiLU", 2.7, 2.6, "op", w=1.4),
        Box("c1", "conv 3×3", 4.4, 2.6, "net", w=1.3),
        Box("add", "+", 6.0, 2.6, "op", w=0.6),
        Box("n2", "GroupNorm, SiLU\ndropout", 7.6, 2.6, "op", w=1.8),
        Box("c2", "conv 3×3", 9.4, 2.6, "net", w=1.3),
        Box("res", "+ skip\n(1×1 conv if C changes)", 11.3, 2.6, "op", w=2.0),
        Box("t", "timestep $t$", 2.7, 0.8, "latent", w=1.4),
        Box("emb", "sinusoid\n→ MLP", 4.4, 0.8, "net", w=1.3),
        Box("lin", "SiLU, Linear\n→ [C_out]", 6.0, 0.8, "net", w=1.5),
    ]
    arrows = [Arrow("x", "n1"), Arrow("n1", "c1"), Arrow("c1", "add"), Arrow("add", "n2"),
              Arrow("n2", "c2"), Arrow("c2", "res"), Arrow("t", "emb"), Arrow("emb", "lin"),
              Arrow("lin", "add", "per channel"),
              Arrow("x", "res", "skip", bend=-0.12, dashed=True)]
    return flowchart(boxes, arrows, 12.4, 4.0, "The ResNet block with time injection")


def unet():
    """Chapter 4: the UNet's levels, down and up, with the skip connections."""
    widths = (320, 640, 1280, 1280)
    sizes = (64, 32, 16, 8)
    boxes, arrows = [Box("in", "conv_in\n4 → 320", 0.9, 4.6, "net", w=1.3)], []
    for level, (c, s) in enumerate(zip(widths, sizes)):
        attn = " + attn" if level < 3 else ""
        boxes.append(Box(f"d{level}", f"down {level}: 2× ResNet{attn}\n{c} ch, {s}×{s}",
                         2.9 + level * 0.9, 4.6 - level * 1.05, "net", w=2.4))
        boxes.append(Box(f"u{level}", f"up {level}: 3× ResNet{attn}\n{c} ch, {s}×{s}",
                         11.1 - level * 0.9, 4.6 - level * 1.05, "net", w=2.4))
        arrows.append(Arrow(f"d{level}", f"u{level}", "skips (concat)" if level == 0 else "",
                            dashed=True))
        if level:
            arrows.append(Arrow(f"d{level - 1}", f"d{level}", "↓2"))
            arrows.append(Arrow(f"u{level}", f"u{level - 1}", "↑2"))
    boxes += [Box("mid", "middle: ResNet, attn, ResNet\n1280 ch, 8×8", 7.0, 0.45, "net", w=3.0),
              Box("out", "conv_out\n320 → 4", 13.1, 4.6, "net", w=1.3)]
    arrows += [Arrow("in", "d0"), Arrow("d3", "mid"), Arrow("mid", "u3"), Arrow("u0", "out")]
    return flowchart(boxes, arrows, 14.0, 5.2,
                     "The UNet (SD 1): four levels down, a middle, four up; every block also "
                     "gets $t$, every attn gets $c$")


def vae():
    """Chapter 5: the autoencoder and its Gaussian posterior."""
    boxes = [
        Box("img", "image $x$\n3×512×512", 1.0, 1.6, "latent", w=1.6),
        Box("enc", "encoder\n(ResNets, ↓2 ×3)", 3.4, 1.6, "net", w=1.8),
        Box("post", "$\\mu, \\log\\sigma^2$\n8×64×64", 5.9, 1.6, "op", w=1.6),
        Box("z", "$z = \\mu + \\sigma\\varepsilon$\n× 0.18215", 8.4, 1.6, "latent", w=1.8),
        Box("dec", "decoder\n(ResNets, ↑2 ×3)", 11.0, 1.6, "net", w=1.8),
        Box("rec", "image $\\hat x$", 13.2, 1.6, "latent", w=1.4),
    ]
    arrows = [Arrow("img", "enc"), Arrow("enc", "post"), Arrow("post", "z", "sample"),
              Arrow("z", "dec", "÷ 0.18215"), Arrow("dec", "rec")]
    return flowchart(boxes, arrows, 14.1, 2.7,
                     "The VAE: 48× fewer numbers for the UNet to work on")


def text_encoder():
    """Chapter 6: the tokenizer and the CLIP text encoder."""
    boxes = [
        Box("text", '"A red circle!"', 1.0, 1.6, "text", w=1.7),
        Box("clean", "clean\n(ftfy, lower)", 2.9, 1.6, "op", w=1.5),
        Box("bpe", "BPE merges\n→ ids", 4.7, 1.6, "op", w=1.5),
        Box("pad", "BOS … EOS, pad\nto 77 ids", 6.6, 1.6, "op", w=1.7),
        Box("emb", "token + position\nembeddings", 8.6, 1.6, "net", w=1.8),
        Box("tf", "12 causal\ntransformer layers", 10.7, 1.6, "net", w=1.9),
        Box("ctx", "context $c$\n77×768", 12.7, 1.6, "text", w=1.5),
    ]
    arrows = [Arrow("text", "clean"), Arrow("clean", "bpe"), Arrow("bpe", "pad"),
              Arrow("pad", "emb"), Arrow("emb", "tf"), Arrow("tf", "ctx", "final LN")]
    return flowchart(boxes, arrows, 13.6, 2.7, "From a prompt to the 77 vectors the UNet reads")


def markov_chains(jumps: tuple[int, ...] = ()):
    """Chapter 7 (8 with `jumps`): the forward chain q adds noise, the reverse chain removes it."""
    steps = ["x_0", "x_1", "x_{t-1}", "x_t", "x_{T-1}", "x_T"]
    boxes = [Box(f"x{i}", f"${s}$", 1.0 + 2.3 * i, 1.9, "latent", w=0.9) for i, s in
             enumerate(steps)]
    arrows = []
    for i in range(len(steps) - 1):
        a, b = steps[i], steps[i + 1]
        dotted = i in (1, 3)
        arrows.append(Arrow(f"x{i}", f"x{i + 1}", "" if dotted else f"$q({b}\\mid {a})$",
                            bend=-0.45, dashed=dotted))
        arrows.append(Arrow(f"x{i + 1}", f"x{i}", "" if dotted else f"$p_\\theta({a}\\mid {b})$",
                            bend=-0.45, dashed=dotted))
    title = ("Forward chain $q$ (noise in, fixed) above, reverse chain $p_\\theta$ "
             "(noise out, learned) below")
    for a, b in zip(jumps[:-1], jumps[1:]):
        arrows.append(Arrow(f"x{a}", f"x{b}", bend=-0.3, style="-|>", dashed=True))
    note = "DDIM: jump along a few timesteps (dashed), same trained network" if jumps else ""
    return flowchart(boxes, arrows, 13.5, 3.8 if jumps else 3.3, title, note)


def ddim_jumps():
    """Chapter 8: the reverse chain taken in a few large deterministic steps."""
    return markov_chains(jumps=(5, 3, 0))


def guidance():
    """Chapter 9: one guided denoising step."""
    boxes = [
        Box("xt", "$x_t$", 0.8, 2.0, "latent", w=0.9),
        Box("u", "UNet($x_t$, t, ∅)", 3.0, 3.0, "net", w=2.0),
        Box("c", "UNet($x_t$, t, $c$)", 3.0, 1.0, "net", w=2.0),
        Box("mix", "$\\hat\\varepsilon = \\varepsilon_u + s(\\varepsilon_c - \\varepsilon_u)$",
            6.4, 2.0, "op", w=3.0),
        Box("step", "sampler step\n(DDIM)", 9.3, 2.0, "sampler", w=1.6),
        Box("xp", "$x_{t-1}$", 11.0, 2.0, "latent", w=0.9),
    ]
    arrows = [Arrow("xt", "u"), Arrow("xt", "c"), Arrow("u", "mix", "$\\varepsilon_u$"),
              Arrow("c", "mix", "$\\varepsilon_c$"), Arrow("mix", "step"), Arrow("step", "xp")]
    return flowchart(boxes, arrows, 11.8, 3.7,
                     "Classifier-free guidance: one batch of two, pushed apart by scale $s$")


def conversion():
    """Chapter 10: official checkpoint ↔ minisd through a table of key rules."""
    boxes = [
        Box("off", "official .ckpt /\n.safetensors", 1.2, 1.6, "op", w=2.0),
        Box("det", "detect family\n(keys, shapes)", 3.7, 1.6, "op", w=1.8),
        Box("rules", "key rules table\nofficial_keys.py", 6.1, 1.6, "op", w=1.9),
        Box("mine", "minisd state dict\n+ SDConfig", 8.6, 1.6, "net", w=2.0),
        Box("model", "StableDiffusion\nmodel", 11.0, 1.6, "net", w=1.8),
    ]
    arrows = [Arrow("off", "det"), Arrow("det", "rules"), Arrow("rules", "mine"),
              Arrow("mine", "model", "load"),
              Arrow("mine", "off", "--to official (bit for bit)", bend=0.3, dashed=True)]
    return flowchart(boxes, arrows, 12.2, 3.2, "Converting weights: a table of rules, both ways")


def training():
    """Chapter 11: one training step of the latent diffusion model."""
    boxes = [
        Box("img", "image, caption", 1.0, 2.6, "latent", w=1.6),
        Box("enc", "frozen VAE\nencoder", 3.2, 2.6, "net", w=1.5),
        Box("noise", "$x_t = \\sqrt{\\bar\\alpha_t}x_0 + \\sqrt{1-\\bar\\alpha_t}\\varepsilon$",
            6.1, 2.6, "op", w=3.2),
        Box("unet", "UNet($x_t$, t, $c$)", 9.3, 2.6, "net", w=1.9),
        Box("loss", "MSE to $\\varepsilon$ (or $v$)", 11.8, 2.6, "op", w=2.2),
        Box("eps", "random $t$, $\\varepsilon$", 6.1, 0.9, "op", w=1.8),
        Box("txt", "text encoder", 9.3, 4.3, "net", w=1.6),
    ]
    arrows = [Arrow("img", "enc"), Arrow("enc", "noise", "$x_0$"), Arrow("eps", "noise"),
              Arrow("noise", "unet"), Arrow("txt", "unet", "c"), Arrow("unet", "loss"),
              Arrow("img", "txt", "caption (10% of the time: empty)", bend=-0.1, dashed=True)]
    return flowchart(boxes, arrows, 13.1, 5.0,
                     "One training step: noise a latent, predict the noise")


def ode_samplers():
    """Chapter 12: the sampler family as solvers of one ODE, dx/dσ = (x − D(x; σ))/σ."""
    boxes = [
        Box("unet", "UNet → denoiser\n$D(x;\\sigma) = x - \\sigma\\hat\\varepsilon$", 1.6, 4.3,
            "net", w=2.6),
        Box("ode", "probability-flow ODE\n$dx/d\\sigma = (x - D(x;\\sigma))/\\sigma$", 6.0, 4.3,
            "op", w=3.0),
        Box("sde", "reverse SDE\nthe ODE + fresh noise", 11.4, 4.3, "op", w=2.6),
        Box("euler", "Euler\n= DDIM ($\\eta = 0$)", 2.6, 2.4, "sampler", w=2.0),
        Box("heun", "Heun\n2 calls per step", 5.0, 2.4, "sampler", w=2.0),
        Box("dpm", "DPM-Solver++ 2M\n1 call, reuses $\\hat x_0$", 7.6, 2.4, "sampler", w=2.5),
        Box("anc", "Euler ancestral\n(and DDPM)", 10.3, 2.4, "sampler", w=2.0),
        Box("dpmsde", "DPM-Solver++\n2M SDE", 12.7, 2.4, "sampler", w=2.0),
        Box("karras", "Karras $\\sigma$: $\\sigma^{1/\\rho}$ evenly spaced ($\\rho = 7$)\n"
            "where the steps go, for any solver", 5.0, 0.7, "op", w=4.6),
    ]
    arrows = [Arrow("unet", "ode", "slope $(x - D)/\\sigma$"),
              Arrow("ode", "euler", "1st order"), Arrow("ode", "heun", "2nd"),
              Arrow("ode", "dpm", "2nd"), Arrow("ode", "sde", "+ noise each step"),
              Arrow("sde", "anc"), Arrow("sde", "dpmsde"),
              Arrow("karras", "euler", dashed=True), Arrow("karras", "heun", dashed=True),
              Arrow("karras", "dpm", dashed=True)]
    return flowchart(boxes, arrows, 14.0, 5.2,
                     "Samplers are ODE (or SDE) solvers: integrate from $\\sigma_{\\max}$ "
                     "(noise) down to $\\sigma = 0$ (image)")


def two_towers():
    """Chapter 13: CLIP's two towers, the N × N similarity matrix, the loss both ways."""
    boxes = [
        Box("img", "N images\n3×32×32", 1.0, 3.9, "latent", w=1.6),
        Box("vit", "image tower\n(ViT, class token)", 3.3, 3.9, "net", w=2.0),
        Box("u", "$W_{img}$, normalize\n→ $u_i$", 5.6, 3.9, "net", w=1.9),
        Box("cap", "N captions\n77 ids each", 1.0, 1.1, "text", w=1.6),
        Box("txt", "text tower\n(causal, [EOS] state)", 3.3, 1.1, "net", w=2.0),
        Box("v", "$W_{txt}$, normalize\n→ $v_j$", 5.6, 1.1, "net", w=1.9),
        Box("scale", "$s = e^{\\tau}$, learned, ≤ 100", 8.6, 4.4, "op", w=2.6),
        Box("sim", "logits $s\\,u_i^\\top v_j$\nN × N", 8.6, 2.5, "op", w=2.0, h=0.9),
        Box("loss", "cross-entropy, targets = diagonal\nover rows (image → caption)\n"
            "and columns (caption → image), ÷ 2", 11.6, 2.5, "op", w=3.2, h=1.1),
    ]
    arrows = [Arrow("img", "vit"), Arrow("vit", "u"), Arrow("cap", "txt"), Arrow("txt", "v"),
              Arrow("u", "sim", "$u$"), Arrow("v", "sim", "$v$"), Arrow("scale", "sim"),
              Arrow("sim", "loss")]
    figure = flowchart(boxes, arrows, 13.4, 5.0,
                       "Contrastive pretraining: in a batch of N pairs, each image picks its "
                       "caption and each caption its image")
    # the similarity matrix itself: the pairs (the targets) on the diagonal
    ax, n, cell = figure.axes[0], 4, 0.26
    left, bottom = 8.6 - n * cell / 2, 0.35
    for i in range(n):
        for j in range(n):
            ax.add_patch(Rectangle((left + j * cell, bottom + (n - 1 - i) * cell), cell, cell,
                                   facecolor=COLOURS["sampler"] if i == j else "white",
                                   edgecolor="#555555", linewidth=0.6))
    ax.text(left + n * cell + 0.15, bottom + n * cell / 2, "matching pairs\non the diagonal",
            ha="left", va="center", fontsize=7.5, color="#333333")
    return figure


CHAPTER_DIAGRAMS = {
    "00": latent_diffusion, "01": attention, "02": transformer_block, "03": resnet_block,
    "04": unet, "05": vae, "06": text_encoder, "07": markov_chains, "08": ddim_jumps,
    "09": guidance, "10": conversion, "11": training, "12": ode_samplers, "13": two_towers,
}


def draw(chapter: str):
    """The opening diagram of chapter `chapter` ("00" … "13"), as a matplotlib Figure."""
    if chapter not in CHAPTER_DIAGRAMS:
        raise ValueError(f"no diagram for chapter {chapter!r}; "
                         f"chapters: {sorted(CHAPTER_DIAGRAMS)}")
    return CHAPTER_DIAGRAMS[chapter]()
