"""minisd.tokenizer against OpenAI CLIP's SimpleTokenizer (the copy in open_clip_torch, loaded by
file path).

Exact id equality on a few thousand strings (hand-written edge cases, generated prompts, hypothesis
text), the [B, 77] batch against open_clip's `tokenize` rule, decode round trips, and a stored
fixture of reference ids that is checked even where open_clip_torch is not installed.
"""

from __future__ import annotations

import ast
import doctest
import hashlib
import importlib.util
import json
import random
import warnings
from pathlib import Path

import pytest
import regex
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import minisd.tokenizer as tokenizer_module
from minisd.tokenizer import CLIPTokenizer, clean_text

FIXTURES = Path(__file__).with_name("fixtures")
BOS, EOS = 49406, 49407

# The pre-tokenizer regex as the spec states it, compiled here so the decode property does not lean
# on minisd's copy.
SPEC_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def _load_fixture_script():
    spec = importlib.util.spec_from_file_location(
        "make_tokenizer_fixture", FIXTURES / "make_tokenizer_fixture.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# string generators and the reference loader; imports no open_clip by itself
fixture_script = _load_fixture_script()


@pytest.fixture(scope="module")
def sd1():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def sd2():
    return CLIPTokenizer(pad_token_id=0)


@pytest.fixture(scope="module")
def ref_module():
    module = fixture_script.load_reference_module()
    if module is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    return module


@pytest.fixture(scope="module")
def ref(ref_module):
    return ref_module.SimpleTokenizer()


def reference_batch(ref, texts, context_length=77):
    """open_clip's `tokenize` rule, built from SimpleTokenizer.encode: sot + ids + eot, cut with eot
    last, pad 0."""
    batch = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [ref.sot_token_id] + ref.encode(text) + [ref.eot_token_id]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = ref.eot_token_id
        batch[row, : len(ids)] = torch.tensor(ids)
    return batch


def assert_same_ids(ours, ref, ref_module, texts):
    """Exact id equality for every text (special-token literals excluded, see SPECIAL_LITERALS);
    returns the count."""
    compared, mismatches = 0, []
    for text in texts:
        if fixture_script.has_special_literal(ref_module, text):
            continue
        compared += 1
        expected, got = ref.encode(text), ours.encode(text)
        if got != expected:
            mismatches.append((text, expected, got))
    assert not mismatches, f"{len(mismatches)} of {compared} differ; first: {mismatches[:3]}"
    return compared


def expected_decoding(ref_module, text):
    """What decode(encode(text)) must give: the cleaned text's regex pieces joined by single
    spaces."""
    return " ".join(SPEC_PATTERN.findall(fixture_script.reference_clean(ref_module, text)))


def generated_strings(ref_module):
    rng = random.Random(20240611)
    return (
        fixture_script.prompt_combinations()
        + fixture_script.vocab_walk_strings(ref_module, rng, 800)
        + fixture_script.random_unicode_strings(rng, 800)
    )


# ---------------------------------------------------------------- without open_clip: the stored
# fixture


def test_fixture_ids(sd1):
    fixture = json.loads((FIXTURES / "tokenizer_reference.json").read_text())
    assert len(fixture["cases"]) >= 250
    mismatches = [
        (c["text"], c["ids"], sd1.encode(c["text"]))
        for c in fixture["cases"]
        if sd1.encode(c["text"]) != c["ids"]
    ]
    assert not mismatches, (
        f"{len(mismatches)} of {len(fixture['cases'])} differ (fixture made with "
        f"{fixture['versions']}); first: {mismatches[:3]}"
    )


def test_fixture_rows_with_both_pad_ids(sd1, sd2):
    fixture = json.loads((FIXTURES / "tokenizer_reference.json").read_text())
    texts = [item["text"] for item in fixture["tokenize_pad0"]]
    rows = torch.tensor([item["row"] for item in fixture["tokenize_pad0"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(sd2(texts), rows)
        ours_sd1 = sd1(texts)
    eos_position = (rows == EOS).int().argmax(dim=1, keepdim=True)
    after_eos = torch.arange(rows.shape[1]) > eos_position
    assert torch.equal(ours_sd1, torch.where(after_eos, EOS, rows))


# ---------------------------------------------------------------- exact ids against open_clip's
# SimpleTokenizer


def test_vocabulary_and_merges_match_reference(sd1, ref):
    assert sd1.vocab_size == ref.vocab_size == 49408
    assert (
        (sd1.bos_token_id, sd1.eos_token_id) == (ref.sot_token_id, ref.eot_token_id) == (BOS, EOS)
    )
    assert sd1.model_max_length == 77
    # every id below the specials names the same token (the specials are spelled differently, see
    # SPECIAL_LITERALS)
    assert sd1.id_to_token[:BOS] == [ref.decoder[i] for i in range(BOS)]
    assert sd1.merge_rank == ref.bpe_ranks
    assert sd1.byte_to_symbol == ref.byte_encoder


def test_shipped_vocab_file_is_openais(ref_module):
    shipped = tokenizer_module.DEFAULT_VOCAB_FILE.read_bytes()
    assert (
        hashlib.sha256(shipped).digest()
        == hashlib.sha256(Path(ref_module.default_bpe()).read_bytes()).digest()
    )
    licence = (tokenizer_module.DEFAULT_VOCAB_FILE.parent / "LICENSE-CLIP-BPE.txt").read_text()
    assert "Copyright (c) 2021 OpenAI" in licence and "MIT License" in licence


def test_hand_written_strings(sd1, ref, ref_module):
    assert assert_same_ids(sd1, ref, ref_module, fixture_script.HAND_WRITTEN) >= 120


def test_fixture_strings_live(sd1, ref, ref_module):
    texts = [
        c["text"] for c in json.loads((FIXTURES / "tokenizer_reference.json").read_text())["cases"]
    ]
    assert assert_same_ids(sd1, ref, ref_module, texts) == len(texts)


def test_generated_strings(sd1, ref, ref_module):
    assert assert_same_ids(sd1, ref, ref_module, generated_strings(ref_module)) >= 2000


@settings(
    max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(text=st.text())
def test_random_text(sd1, ref, ref_module, text):
    assume(not fixture_script.has_special_literal(ref_module, text))
    ids = sd1.encode(text)
    assert ids == ref.encode(text)
    assert clean_text(text) == fixture_script.reference_clean(ref_module, text)
    assert sd1.decode(ids) == ref.decode(ids).strip() == expected_decoding(ref_module, text)


PROMPT_ALPHABET = st.sampled_from(
    list("abcdefghijklmnopqrstuvwxyz ABCXYZ0189 ,.;:!?'\"()[]-_&#é漢🐱\t\n")
    + ["&amp;", "&#39;", "'s", "'ll", "  "]
)


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(pieces=st.lists(PROMPT_ALPHABET, max_size=40))
def test_random_prompt_like_text(sd1, sd2, ref, ref_module, pieces):
    text = "".join(pieces)
    assert sd1.encode(text) == ref.encode(text)
    assert torch.equal(sd2([text]), reference_batch(ref, [text]))


# ---------------------------------------------------------------- the [B, 77] batch


def batch_texts(ref_module):
    rng = random.Random(7)
    texts = fixture_script.HAND_WRITTEN + rng.sample(fixture_script.prompt_combinations(), 100)
    return [t for t in texts if not fixture_script.has_special_literal(ref_module, t)]


def test_batch_pad0_matches_open_clip_tokenize(sd2, ref, ref_module):
    texts = batch_texts(ref_module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = sd2(texts)
    expected = reference_batch(ref, texts)
    assert ours.dtype == torch.long and ours.shape == (len(texts), 77)
    assert torch.equal(ours, expected)
    # open_clip's own __call__ agrees with the rule rebuilt above
    assert torch.equal(ours, ref(texts))


def test_batch_pad_eos_has_eos_tail(sd1, sd2, ref_module):
    texts = batch_texts(ref_module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padded_eos, padded_zero = sd1(texts), sd2(texts)
    for row_eos, row_zero, text in zip(padded_eos, padded_zero, texts):
        length = min(len(sd1.encode(text)) + 2, 77)
        assert torch.equal(row_eos[:length], row_zero[:length])
        assert row_zero[length - 1] == EOS and row_eos[0] == BOS
        assert (row_eos[length:] == EOS).all() and (row_zero[length:] == 0).all()


def test_single_string_is_a_batch_of_one(sd1):
    one = sd1("a cat")
    assert one.shape == (1, 77) and one.dtype == torch.long
    assert torch.equal(one, sd1(["a cat"])) and torch.equal(one, sd1(("a cat",)))
    assert sd1([]).shape == (0, 77)
    assert sd1(["a cat", "a dog"], max_length=10).shape == (2, 10)


def test_truncation_keeps_eos_and_warns(sd1, sd2, ref):
    prompt = fixture_script.LONG_PROMPT
    ref_ids = ref.encode(prompt)
    assert len(ref_ids) > 75
    with pytest.warns(
        UserWarning,
        match=rf"dropped its last {len(ref_ids) - 75} token\(s\).*a highly detailed matte",
    ):
        row = sd2(prompt)[0]
    assert row.tolist() == [BOS] + ref_ids[:75] + [EOS]
    with pytest.warns(UserWarning, match=r"dropped its last 1 token\(s\)"):
        assert sd1(["word " * 76])[0, -1] == EOS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 ids + BOS + EOS fill the context: no warning
        row = sd1("word " * 75)[0]
    assert row[0] == BOS and row[-1] == EOS and (row[1:-1] != EOS).all()


# ---------------------------------------------------------------- decode


def test_decode_round_trip_matches_reference(sd1, ref, ref_module):
    texts = [
        t
        for t in fixture_script.HAND_WRITTEN + generated_strings(ref_module)
        if not fixture_script.has_special_literal(ref_module, t)
    ]
    for text in texts:
        decoded = sd1.decode(sd1.encode(text))
        assert (
            decoded == ref.decode(ref.encode(text)).strip() == expected_decoding(ref_module, text)
        ), text


def test_decode_of_ordinary_prompts_is_the_cleaned_text(sd1, ref_module):
    # cleaned text made of letter words and spaces: one regex piece per word, so the pieces joined
    # by spaces are exactly the cleaned text (punctuation or digits would come back space-separated:
    # "a cat, 42" -> "a cat , 4 2"). The test is on the cleaned text: lowercasing can make a mark,
    # "İ".lower() == "i" + U+0307, a piece of its own.
    only_letters = regex.compile(r"[\p{L} ]*")
    texts = [
        t
        for t in fixture_script.HAND_WRITTEN + fixture_script.prompt_combinations()
        if only_letters.fullmatch(fixture_script.reference_clean(ref_module, t))
    ]
    assert len(texts) >= 30
    for text in texts:
        assert (
            sd1.decode(sd1.encode(text))
            == clean_text(text)
            == fixture_script.reference_clean(ref_module, text)
        )


def test_decode_drops_specials_and_padding(sd1, sd2):
    text = "An astronaut, riding a horse!"
    plain = sd1.decode(sd1.encode(text))
    assert plain == "an astronaut , riding a horse !"
    assert sd1.decode([BOS, *sd1.encode(text), EOS]) == plain
    assert sd1.decode(sd1(text)[0]) == plain  # EOS padding
    assert sd2.decode(sd2(text)[0]) == plain  # 0 padding is '!': dropped because it follows EOS


def test_decode_rejects_bad_ids(sd1):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sd1.decode([49408])
    with pytest.raises(TypeError, match="ids must be"):
        sd1.decode("a cat")
    with pytest.raises(TypeError, match="ids must be"):
        sd1.decode(sd1(["a", "b"]))  # 2-D


# ---------------------------------------------------------------- special-token literals (OpenAI's
# spelling)


def test_special_token_literals_follow_openai(sd1, ref):
    # OpenAI's tokenizer turns a typed "<|endoftext|>" into the EOS id; open_clip's copy renamed its
    # specials to <start_of_text>/<end_of_text>, which minisd treats as ordinary text.
    assert sd1.encode("<|startoftext|>") == [BOS] and sd1.encode("<|ENDOFTEXT|>") == [EOS]
    assert sd1.encode("A cat <|endoftext|>dog") == ref.encode("a cat") + [EOS] + ref.encode("dog")
    assert sd1.encode("<start_of_text>") == ref.encode("< start _ of _ text >")


# ---------------------------------------------------------------- BPE steps


def test_bpe_steps_are_reference_merges_in_rank_order(sd1, ref):
    for word in [
        "photographer",
        "antidisestablishmentarianism",
        "astronaut",
        "a",
        "lll",
        "zzzzzzzz",
        "ãé",
    ]:
        steps = sd1.bpe_steps(word)
        assert steps[0] == (*word[:-1], word[-1] + "</w>")
        assert steps[-1] == sd1.bpe(word) == tuple(ref.bpe(word).split(" "))
        ranks = []
        for before, after in zip(steps, steps[1:]):
            assert "".join(before) == "".join(after) and len(after) < len(before)
            merged = [
                pair
                for pair in zip(before, before[1:])
                if "".join(pair) in after and pair in ref.bpe_ranks
            ]
            ranks.append(min(ref.bpe_ranks[pair] for pair in merged))
        # lowest rank first, and a merge never enables an earlier-ranked one
        assert ranks == sorted(ranks)
    assert sd1.bpe_steps("<|endoftext|>") == [("<|endoftext|>",)]


def test_module_doctest():
    assert doctest.testmod(tokenizer_module).failed == 0


# ---------------------------------------------------------------- input checks and imports


@pytest.mark.parametrize("bad", [123, None, b"bytes", {"a cat"}, ["a cat", 3], [["nested"]]])
def test_bad_prompts_raise_type_error(sd1, bad):
    with pytest.raises(TypeError, match="prompts must be a string or a list of strings, got"):
        sd1(bad)


def test_bad_arguments(sd1):
    with pytest.raises(TypeError, match="text must be a string"):
        sd1.encode(["a cat"])
    with pytest.raises(ValueError, match="max_length"):
        sd1("a cat", max_length=1)
    with pytest.raises(ValueError, match="pad_token_id"):
        CLIPTokenizer(pad_token_id=49408)
    with pytest.raises(TypeError, match="pad_token_id"):
        CLIPTokenizer(pad_token_id="0")


def test_imports_only_allowed_libraries():
    tree = ast.parse(Path(tokenizer_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {
        "__future__",
        "gzip",
        "html",
        "operator",
        "warnings",
        "functools",
        "pathlib",
        "typing",
        "ftfy",
        "regex",
        "torch",
    }, imported


# ---------------------------------------------------------------- the two families' special tokens

SPECIAL_PROMPTS = [
    "a cat <|endoftext|> a dog",
    "<|startoftext|>a photo<|endoftext|>",
    "a cat <end_of_text> and <start_of_text> a hat",
    "<|ENDOFTEXT|> upper case",
    "x<|endoftext|>y <|endoftext|><|endoftext|>",
]


def test_sd2_family_follows_openclip_special_tokens(ref):
    """SD 2's official code tokenizes with OpenCLIP's SimpleTokenizer: "<|endoftext|>" in a prompt
    is plain text in BPE pieces, "<end_of_text>" is the end token."""
    ours = CLIPTokenizer(pad_token_id=0, family="openclip")
    for text in SPECIAL_PROMPTS + ["a red circle", "<end_of_text>"]:
        assert ours.encode(text) == ref.encode(text), text
    assert 49407 not in ours.encode("a cat <|endoftext|> a dog")
    assert torch.equal(ours(SPECIAL_PROMPTS), reference_batch(ref, SPECIAL_PROMPTS))


def test_sd1_family_follows_openai_clip_special_tokens(tmp_path):
    """SD 1 (OpenAI's tokenizer, transformers' CLIPTokenizer) reads "<|endoftext|>" in a prompt as
    the end token 49407. transformers' tokenizer is built here from minisd's own vocabulary file
    (the same 49,408 tokens and merges: test_vocabulary_and_merges_match_reference), so no download
    is needed; these prompts are plain ASCII, where its missing ftfy step changes nothing."""
    transformers = pytest.importorskip("transformers")
    ours = CLIPTokenizer()
    vocab = {token: i for i, token in enumerate(ours.id_to_token)}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(ours.merge_rank, key=ours.merge_rank.get)
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    reference = transformers.CLIPTokenizer(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    )
    for text in SPECIAL_PROMPTS[:2] + SPECIAL_PROMPTS[4:] + ["a red circle"]:
        expected = reference(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == expected, text
    assert 49407 in ours.encode("a cat <|endoftext|> a dog")


def test_a_model_picks_its_family():
    import minisd

    assert minisd.StableDiffusion(minisd.tiny()).tokenizer.family == "clip"
    with torch.device("meta"):
        sd2 = minisd.StableDiffusion(minisd.sd2())
    assert sd2.tokenizer.family == "openclip" and sd2.tokenizer.pad_token_id == 0
