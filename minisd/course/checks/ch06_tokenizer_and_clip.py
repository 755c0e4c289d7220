"""Chapter 06 (tokenizer and CLIP): the byte-pair-encoding merge loop."""

from __future__ import annotations

import torch

from minisd.attention import causal_mask
from minisd.tokenizer import END_OF_WORD, CLIPTokenizer, merge_pair

from . import Task

TITLE = "The tokenizer and the CLIP text encoder"
GOALS = [
    "Turn a prompt into CLIP's 77 token ids: cleaning, pre-tokenizing, bytes to symbols, BPE "
    "merges, BOS/EOS, padding.",
    "Write the BPE merge loop and reproduce CLIP's splits of real words.",
    "Run the CLIP text encoder and see what the UNet receives: one vector per token.",
]
PREREQUISITES = {
    "Math": "none beyond counting; the idea of a greedy algorithm.",
    "PyTorch": "Python tuples, dicts and loops; nn.Embedding, nn.LayerNorm.",
}
READING_MINUTES = 60

WORDS = [
    "astronaut",
    "riding",
    "horse",
    "photograph",
    "watercolor",
    "painting",
    "lighthouse",
    "sunset",
    "cyberpunk",
    "portrait",
    "mountains",
    "reflections",
    "highly",
    "detailed",
    "octane",
    "render",
    "impressionist",
    "banana",
    "squirrel",
    "steampunk",
    "trending",
    "artstation",
    "bioluminescent",
    "jellyfish",
    "underwater",
    "cathedral",
    "minimalist",
    "unbelievable",
    "tokenization",
    "diffusion",
    "zzzzzz",
    "aaaa",
    "ok",
]


def merge_all(symbols, ranks) -> list[str]:
    """The merge loop of minisd.tokenizer.merge_steps, on a given list of symbols: merge the
    lowest-ranked adjacent pair everywhere (minisd's merge_pair), until no adjacent pair has a rank.
    """
    symbols = tuple(symbols)
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        symbols = merge_pair(symbols, best)
    return list(symbols)


def _random_case(ctx):
    """A random word over a tiny alphabet (so pairs repeat) and random ranks for pairs that can
    occur."""
    alphabet = ctx.choice(["ab", "abc", "abcd"])
    symbols = [ctx.choice(alphabet) for _ in range(ctx.integer(1, 12))]
    ranks, frontier = {}, sorted(set(alphabet))
    for rank in range(ctx.integer(1, 8)):
        pair = (ctx.choice(frontier), ctx.choice(frontier))
        if pair not in ranks:
            ranks[pair] = rank * 10 + ctx.integer(0, 9)
            frontier.append(pair[0] + pair[1])
    return symbols, ranks


def _compare(ctx, got, expected, symbols, ranks_text):
    if isinstance(got, tuple):
        got = list(got)
    if not isinstance(got, list):
        ctx.fail(
            f"expected a list of strings, got {type(got).__name__}"
            + (" (did you forget `return`?)" if got is None else "")
        )
    if any(not isinstance(s, str) for s in got):
        ctx.fail(f"expected a list of strings, got {got!r}")
    if got != expected:
        hint = ""
        if "".join(got) != "".join(expected):
            hint = (
                " (your symbols do not even spell the same text: merging must only join neighbours)"
            )
        elif len(got) > len(expected):
            hint = " (you stopped merging too early)"
        elif len(got) < len(expected):
            hint = " (you merged pairs that have no rank, or merged too much)"
        ctx.fail(f"for symbols {symbols} with {ranks_text}: expected {expected}, got {got}{hint}")


def check_bpe_merge(ctx):
    for i in range(6):
        symbols, ranks = _random_case(ctx)
        # changing the list in place fails the call itself
        got = ctx.call(list(symbols), dict(ranks))
        _compare(ctx, got, merge_all(symbols, ranks), symbols, f"ranks {ranks}")
    tokenizer = CLIPTokenizer()
    for word in {ctx.choice(WORDS) for _ in range(4)}:
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        expected = list(tokenizer.bpe(word))
        _compare(
            ctx,
            ctx.call(list(symbols), tokenizer.merge_rank),
            expected,
            symbols,
            "CLIP's merge ranks",
        )



# ------------------------------------------------------------------ warm-ups: the 77 ids, and the causal mask

def check_pad_ids(ctx):
    import warnings
    pad = ctx.choice([49407, 0])
    tok = CLIPTokenizer(pad_token_id=pad)
    for label, n_words, length in (("a short prompt", ctx.integer(1, 6), 77),
                                   ("a prompt longer than the context", ctx.integer(12, 20), ctx.integer(8, 12))):
        text = " ".join(ctx.choice(WORDS) for _ in range(n_words))
        ids = tok.encode(text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = tok(text, max_length=length)[0].tolist()   # minisd's tokenizer: the reference
        with ctx.case(f"{label} ({len(ids)} ids), length {length}, pad id {pad}"):
            got = ctx.call(list(ids), tok.bos_token_id, tok.eos_token_id, pad, length)
            if isinstance(got, torch.Tensor):
                got = got.tolist()
            if not isinstance(got, (list, tuple)) or [int(i) for i in got] != expected:
                hint = ""
                if isinstance(got, (list, tuple)) and len(got) == length and got[-1] != expected[-1] \
                        and len(ids) + 2 > length:
                    hint = "; a cut prompt must still end with EOS"
                elif isinstance(got, (list, tuple)) and len(got) != length:
                    hint = f"; yours has {len(got)} ids"
                ctx.fail(f"expected {expected}, got {got}{hint}")


def check_causal_mask(ctx):
    for n in (1, ctx.integer(2, 5), ctx.integer(6, 12)):
        expected = causal_mask(n)
        with ctx.case(f"n = {n}"):
            got = ctx.expect_tensor(ctx.call(n), "the mask")
            if got.dtype != torch.bool:
                ctx.fail(f"expected a bool tensor (True = may attend), got dtype {got.dtype}")
            if tuple(got.shape) == (n, n) and torch.equal(got, expected.T) and n > 1:
                ctx.fail("your mask is transposed: query i (row) may see keys j ≤ i (columns), not j ≥ i")
            if tuple(got.shape) == (n, n) and torch.equal(got, ~expected) and n > 1:
                ctx.fail("your mask is inverted: True marks the keys a query MAY attend to")
            ctx.expect_close(got.float(), expected.float(), what="mask")


TASKS = [
    Task("bpe_merge", "(symbols, ranks)",
         "Byte-pair encoding of one word: given its symbols (a list of strings) and `ranks` (a dict from a pair of "
         "symbols to its merge rank, lowest merged first), repeatedly find the adjacent pair with the lowest rank "
         "and merge every occurrence of it, left to right; stop when no adjacent pair has a rank. Return the final "
         "list of symbols.",
         check_bpe_merge,
         "random words over small alphabets with random ranks (repeated pairs, chains of merges), and real words "
         "with CLIP's 48,894 merges against minisd's tokenizer.",
         level="core", minutes=40,
         allowed="plain Python (tuples, dicts, min).",
             forbidden=("minisd.tokenizer.CLIPTokenizer.bpe", "minisd.tokenizer.merge_steps")),
    Task("pad_ids", "(ids, bos, eos, pad, length=77)",
         "The row of token ids the text encoder reads, as a list of `length` ints: BOS, the prompt's ids, EOS, "
         "then `pad` up to the length. A prompt too long keeps its first length − 2 ids and still ends with EOS.",
         check_pad_ids,
         "short and over-long prompts, SD 1's (EOS) and SD 2's (0) padding, against minisd's CLIPTokenizer.",
         level="warm-up", minutes=10, allowed="plain Python."),
    Task("causal_mask", "(n)",
         "The causal mask of CLIP's text encoder: a bool tensor [n, n] that is True where query i may attend "
         "to key j, i.e. j ≤ i.",
         check_causal_mask,
         "n = 1 and random n, against minisd.attention.causal_mask.",
         level="warm-up", minutes=5, allowed="torch."),

]
