"""Chapter 06 (tokenizer and CLIP): the byte-pair-encoding merge loop."""
from __future__ import annotations

from minisd.tokenizer import END_OF_WORD, CLIPTokenizer, merge_pair

from . import Task

TITLE = "The tokenizer and the CLIP text encoder"
GOALS = [
    "Turn a prompt into CLIP's 77 token ids: cleaning, pre-tokenizing, bytes to symbols, BPE merges, BOS/EOS, padding.",
    "Write the BPE merge loop and reproduce CLIP's splits of real words.",
    "Run the CLIP text encoder and see what the UNet receives: one vector per token.",
]
PREREQUISITES = {
    "Math": "none beyond counting; the idea of a greedy algorithm.",
    "PyTorch": "Python tuples, dicts and loops; nn.Embedding, nn.LayerNorm.",
}
READING_MINUTES = 60

WORDS = ["astronaut", "riding", "horse", "photograph", "watercolor", "painting", "lighthouse", "sunset", "cyberpunk",
         "portrait", "mountains", "reflections", "highly", "detailed", "octane", "render", "impressionist", "banana",
         "squirrel", "steampunk", "trending", "artstation", "bioluminescent", "jellyfish", "underwater", "cathedral",
         "minimalist", "unbelievable", "tokenization", "diffusion", "zzzzzz", "aaaa", "ok"]


def merge_all(symbols, ranks) -> list[str]:
    """The merge loop of minisd.tokenizer.merge_steps, on a given list of symbols: merge the lowest-ranked adjacent
    pair everywhere (minisd's merge_pair), until no adjacent pair has a rank."""
    symbols = tuple(symbols)
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        symbols = merge_pair(symbols, best)
    return list(symbols)


def _random_case(ctx):
    """A random word over a tiny alphabet (so pairs repeat) and random ranks for pairs that can occur."""
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
        ctx.fail(f"expected a list of strings, got {type(got).__name__}" +
                 (" (did you forget `return`?)" if got is None else ""))
    if any(not isinstance(s, str) for s in got):
        ctx.fail(f"expected a list of strings, got {got!r}")
    if got != expected:
        hint = ""
        if "".join(got) != "".join(expected):
            hint = " (your symbols do not even spell the same text: merging must only join neighbours)"
        elif len(got) > len(expected):
            hint = " (you stopped merging too early)"
        elif len(got) < len(expected):
            hint = " (you merged pairs that have no rank, or merged too much)"
        ctx.fail(f"for symbols {symbols} with {ranks_text}: expected {expected}, got {got}{hint}")


def check_bpe_merge(ctx):
    for i in range(6):
        symbols, ranks = _random_case(ctx)
        given = list(symbols)
        got = ctx.call(given, dict(ranks))
        if given != symbols:
            ctx.fail(f"your function changed the list it was given ({symbols} became {given}); build a new list")
        _compare(ctx, got, merge_all(symbols, ranks), symbols, f"ranks {ranks}")
    tokenizer = CLIPTokenizer()
    for word in {ctx.choice(WORDS) for _ in range(4)}:
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        expected = list(tokenizer.bpe(word))
        _compare(ctx, ctx.call(list(symbols), tokenizer.merge_rank), expected, symbols, "CLIP's merge ranks")


TASKS = [
    Task("bpe_merge", "(symbols, ranks)",
         "Byte-pair encoding of one word: given its symbols (a list of strings) and `ranks` (a dict from a pair of "
         "symbols to its merge rank, lowest merged first), repeatedly find the adjacent pair with the lowest rank "
         "and merge every occurrence of it, left to right; stop when no adjacent pair has a rank. Return the final "
         "list of symbols.",
         check_bpe_merge,
         "random words over small alphabets with random ranks (repeated pairs, chains of merges), and real words "
         "with CLIP's 48,894 merges against minisd's tokenizer."),
]
