"""The tiny CLIP: its loss against written-out sums and known limits, its temperature, its towers
against transformers' CLIPModel, its trainer (resume, bad input) and the bundled weights'
zero-shot accuracy."""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch

from minisd.__main__ import main as cli
from minisd.clip import TextEncoderConfig
from minisd.contrastive import (
    ImageTowerConfig,
    TinyCLIP,
    TinyCLIPConfig,
    contrastive_loss,
    load_tiny_clip,
    save_tiny_clip,
)
from minisd.train import clip_eval
from minisd.train import training as T
from minisd.train.shapes_dataset import COLOURS
from minisd.train.train_clip import distinct_caption_batch
from minisd.weights.keymap import TRANSFORMERS_CLIP, rename_state_dict

SMALL = TinyCLIPConfig(
    image=ImageTowerConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2),
    text=TextEncoderConfig(width=32, layers=2, heads=4),
    embed_dim=16,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a 2-core CI machine
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the loss


def loss_written_out(logits: torch.Tensor) -> float:
    """½ (mean over rows + mean over columns) of −log softmax at the diagonal, with explicit loops
    and a max-shifted log-sum-exp, in Python floats (double precision)."""
    a = logits.double().tolist()
    n = len(a)

    def nll(values: list[float], own: int) -> float:
        top = max(values)
        return top + math.log(sum(math.exp(x - top) for x in values)) - values[own]

    rows = sum(nll(a[i], i) for i in range(n)) / n
    columns = sum(nll([a[i][j] for i in range(n)], j) for j in range(n)) / n
    return (rows + columns) / 2


@pytest.mark.parametrize("n, spread", [(2, 1.0), (7, 5.0), (16, 30.0)])
def test_loss_equals_the_written_out_sums(n, spread):
    torch.manual_seed(n)
    logits = spread * torch.randn(n, n)
    # float32 log-sum-exp of n terms: each exp and the sum carry a relative error of a few ulp
    # (6e-8) of values up to ~max|logit| (here ≤ 4·spread ≈ 120): 120 · 6e-8 · a few ≈ 3e-5 at the
    # largest spread, 1e-6 at the smallest; 1e-6 + 4e-7·spread covers every case with margin.
    assert contrastive_loss(logits).item() == pytest.approx(
        loss_written_out(logits), abs=1e-6 + 4e-7 * spread * n**0.5
    )


def test_loss_is_symmetric_in_images_and_captions():
    torch.manual_seed(0)
    logits = torch.randn(9, 9) * 3
    # swapping images and captions swaps the two cross-entropies: the same sum, to one rounding
    assert contrastive_loss(logits.T).item() == pytest.approx(
        contrastive_loss(logits).item(), rel=1e-6
    )
    # a loss that saw only rows would not be symmetric: the test can tell the two apart
    rows_only = torch.nn.functional.cross_entropy(logits, torch.arange(9)).item()
    assert abs(rows_only - contrastive_loss(logits).item()) > 1e-3


def test_loss_matches_transformers_clip_loss():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss as clip_loss

    torch.manual_seed(1)
    logits = torch.randn(12, 12) * 4
    # transformers writes the same two cross-entropies; the same float32 kernels -> equal to ulps
    assert contrastive_loss(logits).item() == pytest.approx(clip_loss(logits).item(), rel=1e-6)


def test_loss_limits():
    n, d = 8, 16
    # Perfectly aligned, orthonormal embeddings: logits = s·I. Each row's loss is
    # ln(1 + (n−1)e^{−s}); at s = 100 that is 7e-43, zero in float32.
    u = torch.eye(n, d)
    assert contrastive_loss(100 * u @ u.T).item() == pytest.approx(0.0, abs=1e-30)
    # the same loss at s = 5: the formula, to float32 rounding of a value ~0.05
    assert contrastive_loss(5 * u @ u.T).item() == pytest.approx(
        math.log(1 + (n - 1) * math.exp(-5)), rel=1e-5
    )
    # Identical embeddings: every logit equal, every softmax uniform, the loss is ln N (exp(0)
    # terms are exact, so only the final log rounds).
    same = torch.full((n, d), 0.25)
    assert contrastive_loss(14.3 * same @ same.T).item() == pytest.approx(math.log(n), rel=1e-6)


def test_loss_refuses_non_square_logits():
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(3, 4))


# ---------------------------------------------------------------- the temperature


def test_logit_scale_starts_at_1_over_0_07_and_is_clamped_at_100():
    model = TinyCLIP(SMALL)
    assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(250.0))
    assert model.logit_scale.item() == pytest.approx(100.0, rel=1e-6)
    model.clamp_logit_scale_()
    assert model.log_logit_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)


def test_temperature_gradient_matches_its_formula():
    """L(τ) with logits = e^τ·A: dL/dτ = s·½[mean_i(E_p[A_i·] − A_ii) + mean_j(E_q[A_·j] − A_jj)],
    p the row softmax, q the column softmax (the derivative of log-sum-exp is the softmax)."""
    torch.manual_seed(2)
    model = TinyCLIP(SMALL)
    u = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    cosine = u @ v.T
    contrastive_loss(model.logit_scale * cosine).backward()
    a = cosine.double()
    s = model.logit_scale.double().item()
    p, q = (s * a).softmax(dim=1), (s * a).softmax(dim=0)
    rows = ((p * a).sum(dim=1) - a.diagonal()).mean()
    columns = ((q * a).sum(dim=0) - a.diagonal()).mean()
    expected = (s * (rows + columns) / 2).item()
    # float32 softmax and sums over 6 terms of size ≤ s ≈ 14: relative error ~1e-6
    assert model.log_logit_scale.grad.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- the towers


def to_transformers_keys(state: dict) -> dict:
    """transformers CLIPModel keys -> TinyCLIP keys (the text tower through minisd's own table)."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("text_model."):
            (new,) = rename_state_dict({key: value}, TRANSFORMERS_CLIP)
            out["text_tower." + new] = value
            continue
        new = key
        for pattern, replacement in (
            (r"^vision_model\.embeddings\.patch_embedding\.", "image_tower.patch_embedding."),
            (r"^vision_model\.embeddings\.class_embedding$", "image_tower.class_embedding"),
            (
                r"^vision_model\.embeddings\.position_embedding\.weight$",
                "image_tower.position_embedding",
            ),
            (r"^vision_model\.pre_layrnorm\.", "image_tower.norm_pre."),
            (r"^vision_model\.post_layernorm\.", "image_tower.norm_post."),
            (r"^vision_model\.encoder\.layers\.", "image_tower.layers."),
            (r"\.self_attn\.([qkv])_proj\.", r".attn.to_\1."),
            (r"\.self_attn\.out_proj\.", ".attn.to_out."),
            (r"\.layer_norm([12])\.", r".norm\1."),
            (r"\.mlp\.fc([12])\.", r".fc\1."),
            (r"^visual_projection\.", "image_projection."),
            (r"^logit_scale$", "log_logit_scale"),
        ):
            new = re.sub(pattern, replacement, new)
        out[new] = value
    return out


def test_towers_and_logits_match_transformers_clip_model():
    from transformers import CLIPConfig, CLIPModel

    cfg = SMALL
    reference = CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=49408,
                hidden_size=cfg.text.width,
                intermediate_size=4 * cfg.text.width,
                num_hidden_layers=cfg.text.layers,
                num_attention_heads=cfg.text.heads,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                layer_norm_eps=1e-5,
                bos_token_id=49406,
                eos_token_id=49407,  # pooling: the first EOS of each row
            ),
            vision_config=dict(
                hidden_size=cfg.image.width,
                intermediate_size=4 * cfg.image.width,
                num_hidden_layers=cfg.image.layers,
                num_attention_heads=cfg.image.heads,
                image_size=cfg.image.image_size,
                patch_size=cfg.image.patch_size,
                hidden_act="quick_gelu",
                layer_norm_eps=1e-5,
            ),
            projection_dim=cfg.embed_dim,
            logit_scale_init_value=math.log(1 / 0.07),
            attn_implementation="eager",  # softmax(QKᵀ/√d)V written out, like minisd's default
        ),
    ).eval()
    with torch.device("meta"):
        model = TinyCLIP(cfg)
    model.load_state_dict(to_transformers_keys(reference.state_dict()), assign=True)
    model.eval()

    torch.manual_seed(3)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    ids = model.tokenizer(
        [
            "a small red circle on the left",
            "a large blue square",
            "a",
            "a small cyan triangle at the top and a large red square at the bottom",
            "green",
        ]
    )
    with torch.no_grad():
        ours = model(images, ids)
        theirs = reference(input_ids=ids, pixel_values=images).logits_per_image
    # fp32 through ≤ 2 layers on each side, then a product of unit vectors times 14.3: relative
    # error of a few 1e-7 per layer (the same sums, in another order); 2e-5 of the largest logit
    # leaves an order of magnitude of margin.
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err < 2e-5, err


def test_tower_shapes_and_unit_length():
    torch.manual_seed(0)
    model = TinyCLIP(SMALL).eval()
    with torch.no_grad():
        u = model.encode_image(torch.zeros(3, 3, 32, 32))
        v = model.encode_prompts(["a red circle", "a blue square on the left", "a"])
    assert u.shape == v.shape == (3, 16)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="32×32"):
        model.encode_image(torch.zeros(1, 3, 16, 16))


def test_sentence_embedding_is_the_eos_state_whatever_follows_it():
    """v = W·state at EOS: the padding after EOS (EOS or 0, 77 or 20 columns) changes nothing."""
    torch.manual_seed(0)
    model = TinyCLIP(SMALL).eval()
    prompts = ["a small red circle on the left", "a square"]
    eos_padded = model.tokenizer(prompts)
    zero_padded = eos_padded.clone()
    for row in zero_padded:
        first_eos = int((row == 49407).nonzero()[0])
        row[first_eos + 1 :] = 0
    with torch.no_grad():
        full = model.text_tower(eos_padded)  # all 77 positions, no shortcut
        ends = [int((row == 49407).nonzero()[0]) for row in eos_padded]
        expected = torch.nn.functional.normalize(
            model.text_projection(full[torch.arange(2), ends]), dim=-1
        )
        for ids in (eos_padded, zero_padded, eos_padded[:, :20]):
            # the shortcut runs fewer columns: the same sums over the same keys, to rounding
            torch.testing.assert_close(model.encode_text(ids), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="end-of-text"):
        model.encode_text(torch.full((1, 5), 320))


def test_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyCLIP(SMALL)
    save_tiny_clip(model, tmp_path / "clip.safetensors")
    loaded = load_tiny_clip(tmp_path / "clip.safetensors")
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable"):
        load_tiny_clip(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- the trainer


def test_batches_never_hold_two_equal_captions():
    caption_index = torch.tensor([0, 1, 1, 2, 2, 2, 3, 0, 4, 4])
    for step in range(20):
        chosen = distinct_caption_batch(caption_index, 4, T.step_generator(0, step))
        assert len(chosen) == 4
        assert len(set(caption_index[chosen].tolist())) == 4


QUIET = ["--no-progress", "--log-every", "1", "--checkpoint-every", "1000"]


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "small.json"
    path.write_text(SMALL.to_json())
    return path


def train_args(config, out, steps, *extra):
    """A tiny run; a resumed run takes its config from the checkpoint, so it passes no --config."""
    architecture = [] if "--resume" in extra else ["--config", str(config)]
    recipe = ["--batch-size", "8", "--pool-size", "200", "--warmup", "2"]
    return ["train-clip", "--out", str(out), *architecture, "--steps", str(steps), *recipe,
            *QUIET, *extra]


def test_resume_continues_exactly_like_an_uninterrupted_run(small_config, tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    assert cli(train_args(small_config, interrupted, 2)) == 0
    resume = ["--resume", str(interrupted / "checkpoint.pt")]
    assert cli(train_args(small_config, interrupted, 4, *resume)) == 0
    assert cli(train_args(small_config, straight, 4)) == 0
    resumed = T.read_loss_log(interrupted / "loss.jsonl")
    reference = T.read_loss_log(straight / "loss.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    # the same batches and the same arithmetic: equal to float32 rounding of the restored state
    for a, b in zip(resumed, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)
    a = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    b = torch.load(straight / "checkpoint.pt", weights_only=True)
    for key in b["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    loaded = load_tiny_clip(straight / "tiny_clip.safetensors")
    assert loaded.config == SMALL


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_ddp_two_processes_match_one_process_on_the_full_batch(small_config, tmp_path):
    """2 gloo processes × 4 pairs gather their embeddings into one 8×8 loss: the same step as one
    process with batch 8 (all_gather sums the gradient over processes, DDP averages it)."""
    import os
    import subprocess
    import sys

    import minisd

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(minisd.__file__).parents[1]),
    }
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "-m",
            "minisd",
            *train_args(small_config, tmp_path / "two", 2),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    assert cli(train_args(small_config, tmp_path / "one", 2)) == 0  # one thread (fixture)
    a = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    # The same sums split over two processes: float32 reassociation only, ~1e-7 relative, and
    # AdamW's first steps move each weight by about lr whatever the gradient's size: 1e-5 / 1e-6.
    for key in b["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    two_log = T.read_loss_log(tmp_path / "two" / "loss.jsonl")
    one_log = T.read_loss_log(tmp_path / "one" / "loss.jsonl")
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one_log], rel=1e-5)


def test_bad_input_is_refused_with_status_2(small_config, tmp_path, capsys):
    assert cli(train_args(small_config, tmp_path / "a", 2, "--batch-size", "1")) == 2
    assert "--batch-size must be >= 2" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"image": {"patch_size": 5}}))
    assert cli(train_args(wrong, tmp_path / "b", 2)) == 2
    assert "not a multiple of patch_size 5" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save({"kind": "ldm"}, other)
    assert cli(train_args(small_config, tmp_path / "c", 2, "--resume", str(other))) == 2
    assert "not a clip training checkpoint" in capsys.readouterr().err
    # with --resume, --config is refused (the checkpoint holds the config)
    with_config = ["--config", str(small_config), "--resume", str(other)]
    assert cli(train_args(small_config, tmp_path / "d", 2, *with_config)) == 2
    assert "drop --config" in capsys.readouterr().err
    assert not (tmp_path / "c" / "checkpoint.pt").exists()


# ---------------------------------------------------------------- the bundled weights


def test_bundled_tiny_clip_classifies_zero_shot():
    clip = load_tiny_clip()
    assert clip.config == TinyCLIPConfig()
    images, specs = clip_eval.render_split("val", 120, 32, seed=99, two_object_prob=0.0)
    report = clip_eval.zero_shot_report(clip, images, specs)
    # Measured on these 120 fixed images: colour 97.5%, shape 97.5%, size and position 100% (and on
    # 1,000 images: the README's model card). Chance is 17% / 33% / 50% / 20%: a broken tower,
    # pooling or tokenizer falls far below 90%, while another CPU's rounding can only flip the few
    # images whose two best classes nearly tie (well under the 9 that 90% leaves room for).
    assert min(report.values()) >= 0.9, report


# ---------------------------------------------------------------- the chapter's graded tasks


def reference_infonce(image_embeddings, text_embeddings, logit_scale):
    u = torch.nn.functional.normalize(image_embeddings, dim=-1)
    v = torch.nn.functional.normalize(text_embeddings, dim=-1)
    logits = logit_scale * u @ v.T
    targets = torch.arange(len(logits))
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, targets) + ce(logits.T, targets)) / 2


def rows_only_infonce(image_embeddings, text_embeddings, logit_scale):
    u = torch.nn.functional.normalize(image_embeddings, dim=-1)
    v = torch.nn.functional.normalize(text_embeddings, dim=-1)
    logits = logit_scale * u @ v.T
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)))


def no_temperature_infonce(image_embeddings, text_embeddings, logit_scale):
    return reference_infonce(image_embeddings, text_embeddings, torch.tensor(1.0))


def detached_infonce(image_embeddings, text_embeddings, logit_scale):
    return reference_infonce(image_embeddings, text_embeddings, logit_scale).detach()


def reference_zero_shot(image_embeddings, prompt_embeddings, prompt_class, num_classes):
    sums = torch.zeros(num_classes, prompt_embeddings.shape[1])
    sums = sums.index_add(0, prompt_class, prompt_embeddings)
    return (image_embeddings @ torch.nn.functional.normalize(sums, dim=-1).T).argmax(dim=1)


def nearest_prompt_zero_shot(image_embeddings, prompt_embeddings, prompt_class, num_classes):
    return prompt_class[(image_embeddings @ prompt_embeddings.T).argmax(dim=1)]


def unnormalized_mean_zero_shot(image_embeddings, prompt_embeddings, prompt_class, num_classes):
    sums = torch.zeros(num_classes, prompt_embeddings.shape[1])
    sums = sums.index_add(0, prompt_class, prompt_embeddings)
    means = sums / torch.bincount(prompt_class, minlength=num_classes)[:, None]
    return (image_embeddings @ means.T).argmax(dim=1)


def grade_with_the_grader(functions: dict, seeds, tmp_path) -> dict:
    """Grade a notebook defining `functions` {task name: function} with the course grader (the
    sandboxed kernel, as a teacher's batch does), once per seed: -> {seed: {task: (status,
    message)}}."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    from minisd.course.grade import Grader

    cells = ["import torch"]
    for task, fn in functions.items():
        source = inspect.getsource(fn).replace(f"def {fn.__name__}(", f"def {task}(", 1)
        # a wrong variant may call the reference: ship it under its own name too
        cells.append(inspect.getsource(reference_infonce) + "\n" + source)
    nb = nbformat.v4.new_notebook()
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["kernelspec"] = kernel
    nb.metadata["minisd"] = {"chapter": "13"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    path = tmp_path / "assignment.ipynb"
    nbformat.write(nb, path)
    results = {}
    with Grader(fast=True) as grader:
        for seed in seeds:
            report = grader.grade(path, seed=seed, chapter="13")
            results[seed] = {t["task"]: (t["status"], t["message"]) for t in report.tasks}
    return results


def test_chapter_tasks_pass_with_the_reference(tmp_path):
    functions = {"symmetric_infonce": reference_infonce, "zero_shot_predict": reference_zero_shot}
    for seed, tasks in grade_with_the_grader(functions, (0, 1, 2), tmp_path).items():
        for task in functions:
            assert tasks[task][0] == "passed", (seed, task, tasks[task])


@pytest.mark.parametrize(
    "task, wrong, message",
    [
        ("symmetric_infonce", rows_only_infonce, "only asks each image to find its caption"),
        ("symmetric_infonce", no_temperature_infonce, "miss the temperature"),
        ("symmetric_infonce", detached_infonce, "not connected to its inputs"),
        ("zero_shot_predict", nearest_prompt_zero_shot, "nearest single prompt"),
        ("zero_shot_predict", unnormalized_mean_zero_shot, "not renormalized to unit length"),
    ],
)
def test_chapter_tasks_fail_wrong_variants_with_a_useful_message(task, wrong, message, tmp_path):
    for seed, tasks in grade_with_the_grader({task: wrong}, (0, 1), tmp_path).items():
        status, said = tasks[task]
        assert status == "failed" and message in said, (seed, status, said)


# ---------------------------------------------------------------- the evaluation


def test_recall_at_k_counts_ranks_by_hand():
    # rows: image i; columns: captions. Row 0's match ranks 1st, row 1's 2nd, row 2's 3rd.
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.7, 0.6, 0.2]])
    found = clip_eval.recall_at_k(similarity, ks=(1, 2, 3))
    assert found == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0}, rel=1e-6)  # float32 means
    # a tie with another column counts against the match
    assert clip_eval.recall_at_k(torch.ones(2, 2), ks=(1,)) == {1: 0.0}


def test_zero_shot_classes_are_prompt_ensembles():
    prompts = clip_eval.attribute_prompts("colour")
    assert list(prompts) == list(COLOURS)
    # every single-object caption with that colour: 3 shapes × 2 sizes × 5 positions
    for colour, texts in prompts.items():
        assert len(texts) == 30 and all(f" {colour} " in text for text in texts)
    assert len(clip_eval.two_object_captions()) == len(set(clip_eval.two_object_captions())) == 5184


def test_evaluation_command_refuses_bad_input(tmp_path, capsys):
    assert clip_eval.main(["--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "no tiny CLIP file" in capsys.readouterr().err
    assert clip_eval.main(["--count", "0"]) == 2
    assert "--count must be >= 1" in capsys.readouterr().err
