"""CLIP's byte-level BPE tokenizer: a prompt becomes the 77 token ids the text encoder reads.

This reproduces OpenAI CLIP's ``SimpleTokenizer`` id for id (SD 1.x), and OpenCLIP's copy of it
(SD 2.x), which differs only in how BOS and EOS are spelled when typed in a prompt (``family``). For
one prompt:

1. Clean:        ftfy.fix_text, html.unescape twice (web captions are often double-escaped, ``&amp;amp;``),
                 strip, collapse whitespace runs to one space, lowercase.
2. Pre-tokenize: a regex cuts the text into pieces: runs of letters, single digits, runs of other non-space
                 characters (punctuation, emoji), and the contractions 's 't 're 've 'm 'll 'd.
                 Whitespace is dropped.
3. Bytes:        each piece is written as UTF-8 and every byte is replaced by one printable character
                 (``byte_to_symbol_table``), so any text at all is spelled with 256 base symbols: no
                 unknown token.
4. BPE:          the piece is split into those symbols, the last one marked with ``</w>`` (end of word), and then
                 the adjacent pair with the lowest rank in CLIP's merge list is merged, again and
                 again, until no adjacent pair is in the list.
5. Ids:          each final symbol is looked up in the vocabulary.
6. Batch:        [BOS] + ids + [EOS], cut to 77 with EOS kept last, padded with ``pad_token_id``
                 (SD1 pads with EOS = 49407, SD2 with 0).

A worked BPE example with a toy merge list (rank 0 is merged first). ``lower`` starts as five
symbols; the pair ("l", "o") has the lowest rank, then ("lo", "w"), and so on until one symbol is
left:

>>> ranks = {("l", "o"): 0, ("lo", "w"): 1, ("e", "r</w>"): 2, ("low", "er</w>"): 3}
>>> for split in merge_steps("lower", ranks):
...     print(split)
('l', 'o', 'w', 'e', 'r</w>')
('lo', 'w', 'e', 'r</w>')
('low', 'e', 'r</w>')
('low', 'er</w>')
('lower</w>',)

``CLIPTokenizer().bpe_steps(word)`` shows the same thing with CLIP's real 48,894 merges.

Vocabulary layout (49,408 ids): 0-255 the byte symbols, 256-511 the same with ``</w>``, 512-49405
the result of each merge in rank order, 49406 ``<|startoftext|>`` (BOS), 49407 ``<|endoftext|>``
(EOS). The merge list is ``minisd/assets/bpe_simple_vocab_16e6.txt.gz`` (OpenAI, MIT licence: see
LICENSE-CLIP-BPE.txt there).
"""

from __future__ import annotations

import gzip
import html
import operator
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

import ftfy
import regex
import torch

DEFAULT_VOCAB_FILE = Path(__file__).with_name("assets") / "bpe_simple_vocab_16e6.txt.gz"
# The file lists about 262k merges after a version header line; CLIP uses the first 49152 - 256 - 2
# of them.
NUM_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)
# The two tokenizer families, which differ only in how BOS and EOS are spelled. SD 1 tokenizes with
# OpenAI's CLIP tokenizer: "<|startoftext|>" / "<|endoftext|>" typed in a prompt are those tokens.
# SD 2's official code tokenizes with OpenCLIP's copy, whose special tokens are spelled
# "<start_of_text>" / "<end_of_text>": there "<|endoftext|>" in a prompt is ordinary text, cut into
# BPE pieces like any other ("<|", "endoftext", "|>").
FAMILY_SPECIAL_TOKENS = {
    "clip": SPECIAL_TOKENS,
    "openclip": ("<start_of_text>", "<end_of_text>"),
}


def pretokenize_pattern(special_tokens: tuple[str, str]) -> regex.Pattern:
    return regex.compile(
        "|".join(regex.escape(t) for t in special_tokens)  # typed literally, they stay whole
        + r"|'s|'t|'re|'ve|'m|'ll|'d"  # English contractions become pieces of their own
        r"|[\p{L}]+"  # a run of letters, any script
        r"|[\p{N}]"  # numbers are split into single digits
        # a run of anything else that is not whitespace: punctuation, emoji, symbols
        r"|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )


PRETOKENIZE_PATTERN = pretokenize_pattern(SPECIAL_TOKENS)


def family_of(text_config) -> str:
    """'openclip' for SD 2's OpenCLIP text tower (exact GELU), else 'clip' (OpenAI's, quick GELU:
    SD 1 and the models minisd trains)."""
    return "openclip" if text_config.activation == "gelu" else "clip"


def clean_text(text: str) -> str:
    """Step 1: ftfy, html.unescape twice, collapse whitespace (which also strips the ends),
    lowercase."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = " ".join(text.split())
    return text.lower()


def byte_to_symbol_table() -> dict[int, str]:
    """Map each byte 0-255 to one printable character; its insertion order is the order of
    vocabulary ids 0-255.

    The 188 bytes that are printable, non-space Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ')
    stand for themselves and come first. The other 68 (control characters, space, DEL, no-break
    space, soft hyphen) would be invisible or would clash with the space that separates symbols, so
    they become chr(256), chr(257), ... in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    for offset, byte in enumerate(others):
        table[byte] = chr(256 + offset)
    return table


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merge every occurrence of the adjacent pair, scanning left to right (so 'a a a' with
    ('a','a') -> 'aa a')."""
    first, second = pair
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def merge_steps(word: str, merge_rank: Mapping[tuple[str, str], int]) -> Iterator[tuple[str, ...]]:
    """Step 4, the BPE merge loop: yield the split of `word` before the first merge and after every
    merge.

    `word` is one pre-tokenized piece already written in byte symbols. The last split yielded is the
    final one.
    """
    symbols = (*word[:-1], word[-1] + END_OF_WORD)
    yield symbols
    not_a_merge = float("inf")
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: merge_rank.get(pair, not_a_merge))
        if best not in merge_rank:
            return
        symbols = merge_pair(symbols, best)
        yield symbols


@lru_cache(maxsize=None)
def load_merges(vocab_file: str) -> tuple[tuple[str, str], ...]:
    """Read CLIP's merge list (cached, so SD1 and SD2 tokenizers share one copy)."""
    with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is a version header
    merges = tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(
            f"{vocab_file} is not CLIP's merge list: expected {NUM_MERGES} lines 'a b' after the header"
        )
    return merges


def _as_token_id(value) -> int:
    if isinstance(value, bool):
        raise TypeError("ids must be ints, got a bool")
    try:
        return operator.index(value)  # int, numpy integer, 0-d integer tensor
    except TypeError:
        raise TypeError(
            f"ids must be ints (a 1-D sequence), got an element of type {type(value).__name__}"
        ) from None


class CLIPTokenizer:
    """Text -> CLIP token ids. ``tok(prompts)`` gives the [B, 77] LongTensor the text encoder takes.

    pad_token_id: what fills the row after EOS. SD 1.x: 49407 (EOS, the default); SD 2.x: 0.
    family: "clip" (SD 1, OpenAI's tokenizer) or "openclip" (SD 2): how BOS/EOS are spelled when
    typed in a prompt (FAMILY_SPECIAL_TOKENS); everything else is the same.
    """

    model_max_length = 77
    vocab_size = 49408
    bos_token_id = 49406
    eos_token_id = 49407

    def __init__(
        self,
        pad_token_id: int = 49407,
        vocab_file: Union[str, Path] = DEFAULT_VOCAB_FILE,
        family: str = "clip",
    ):
        if family not in FAMILY_SPECIAL_TOKENS:
            raise ValueError(
                f"family must be one of {tuple(FAMILY_SPECIAL_TOKENS)}, got {family!r}"
            )
        self.family = family
        self.special_tokens = FAMILY_SPECIAL_TOKENS[family]
        self.pattern = pretokenize_pattern(self.special_tokens)
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
            raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
        if not 0 <= pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, {self.vocab_size}), got {pad_token_id}")
        self.pad_token_id = pad_token_id

        self.byte_to_symbol = byte_to_symbol_table()
        self.symbol_to_byte = {symbol: byte for byte, symbol in self.byte_to_symbol.items()}
        merges = load_merges(str(vocab_file))
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}

        base = list(self.byte_to_symbol.values())
        merged = ("".join(pair) for pair in merges)
        specials = self.special_tokens
        self.id_to_token = [*base, *(s + END_OF_WORD for s in base), *merged, *specials]
        self.token_to_id = {token: i for i, token in enumerate(self.id_to_token)}
        assert len(self.token_to_id) == self.vocab_size, "vocabulary tokens must be unique"
        assert (
            self.token_to_id[specials[0]] == self.bos_token_id
            and self.token_to_id[specials[1]] == self.eos_token_id
        )
        # prompts repeat words a lot; BPE is the slow part
        self._bpe_cache: dict[str, tuple[str, ...]] = {}

    # ---- the pipeline, one step per method ----

    def pretokenize(self, text: str) -> list[str]:
        """Steps 1-3: the pieces of the cleaned text, each written in byte symbols (plain ASCII is
        unchanged)."""
        pieces = self.pattern.findall(clean_text(text))
        return ["".join(self.byte_to_symbol[b] for b in piece.encode("utf-8")) for piece in pieces]

    def bpe_steps(self, word: str) -> list[tuple[str, ...]]:
        """Every split of one piece during BPE, from single symbols to the final split (for
        teaching)."""
        if not isinstance(word, str) or not word:
            raise ValueError(f"word must be a non-empty string, got {word!r}")
        if word in self.special_tokens:  # never split: one id of its own
            return [(word,)]
        return list(merge_steps(word, self.merge_rank))

    def bpe(self, word: str) -> tuple[str, ...]:
        """The final BPE split of one piece: the last of ``bpe_steps``, cached."""
        if word not in self._bpe_cache:
            *_, final = self.bpe_steps(word)
            self._bpe_cache[word] = final
        return self._bpe_cache[word]

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids, without BOS/EOS."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        return [
            self.token_to_id[token] for word in self.pretokenize(text) for token in self.bpe(word)
        ]

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        """Ids -> text. BOS/EOS are dropped, every ``</w>`` becomes a space, the ends are stripped.

        A row made by ``__call__`` (it starts with BOS) is read only up to its first EOS, since the
        rest is padding (for SD2 the padding is id 0, which is '!'). Each pre-tokenized piece comes
        back followed by a space, so ``decode(encode(s))`` is the cleaned text's pieces joined by
        single spaces: "a cat, 42" -> "a cat , 4 2".
        """
        if hasattr(ids, "tolist"):  # torch tensor or numpy array
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(
                f"ids must be a sequence of ints or a 1-D tensor, got {type(ids).__name__}"
            )
        ids = [_as_token_id(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        if ids and ids[0] == self.bos_token_id and self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]

        data = bytearray()
        for i in ids:
            if i in (self.bos_token_id, self.eos_token_id):
                continue
            token = self.id_to_token[i]
            ends_word = token.endswith(END_OF_WORD)
            if ends_word:
                token = token[: -len(END_OF_WORD)]
            data.extend(self.symbol_to_byte[symbol] for symbol in token)
            if ends_word:
                data.extend(b" ")
        # ids cut in the middle of a multi-byte character decode to U+FFFD instead of failing
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, prompts: Union[str, Sequence[str]], max_length: int = 77) -> torch.Tensor:
        """Prompts -> LongTensor [B, max_length]: BOS + ids + EOS, then padding. A single string is
        a batch of one.

        A prompt too long for the context keeps its first max_length - 2 ids and a final EOS, with a
        warning.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(
                f"prompts must be a string or a list of strings, got {type(prompts).__name__}"
            )
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(
                    "prompts must be a string or a list of strings, "
                    f"got a {type(prompts).__name__} holding a {type(prompt).__name__} at index {index}"
                )
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(
                f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}"
            )

        batch = torch.full((len(prompts), max_length), self.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids = [self.bos_token_id, *self.encode(prompt), self.eos_token_id]
            if len(ids) > max_length:
                kept, dropped = ids[: max_length - 1], ids[max_length - 1 : -1]
                preview = prompt if len(prompt) <= 60 else prompt[:60] + "..."
                warnings.warn(
                    f"prompt longer than CLIP's {max_length}-token context: dropped its last {len(dropped)} "
                    f"token(s) ({self.decode(dropped)[:80]!r}) from prompt {preview!r}",
                    stacklevel=2,
                )
                ids = [*kept, self.eos_token_id]
            batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return batch

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, pad_token_id={self.pad_token_id}, "
            f"family={self.family!r})"
        )
