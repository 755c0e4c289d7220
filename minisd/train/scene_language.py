"""The language of the v2 scenes world: its vocabulary, what a caption means, captions, a parser.

A caption describes a scene as a `SceneSpec`: groups of identical objects, at most one relation,
and optionally the background. Every attribute but the shape may be left out ("a star"), as people
write prompts.

Vocabulary (canonical word first; synonyms after "/"):
    colours      red, orange, yellow, green, cyan/turquoise, blue, purple/violet, pink/magenta
    shapes       circle/disc/disk, square/box, triangle, star, ring/donut/doughnut, cross/plus
                 (plural: + "s", "es" after x; boxes, crosses, pluses)
    sizes        small/little/tiny, large/big
    positions    the 3 x 3 grid of cells: top left, top, top right, left, center, right,
                 bottom left, bottom, bottom right  (center/centre/middle; upper = top,
                 lower = bottom; "top-left", "top left corner", "at the top", "on the left"...)
    relations    "A left of B" (also "to the left of", "on the left of"), "right of", "above"
                 (also "over"), "below" (also "under", "beneath"); between two single objects
    counts       a/an/one = 1, two/2, three/3 (the shape word is then plural)
    backgrounds  white/light, grey/gray, black/dark, gradient, stripes/striped
                 ("on a white background", "on stripes", "against a gradient")
    joiners      "and", "," ;  filler words: the, in, at, on, of, to, corner, background, ...

Meaning (what `satisfies` checks, for ground truth and detections alike): objects are assigned
one-to-one to the caption's instances (a group of count k is k instances); each instance's stated
colour, shape, size and cell must match; "A left of B" means column(A) < column(B), "above" means
row(A) < row(B); a stated background must match; and with `exact` (the full score) the scene has
no object beyond those the caption counts.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
SIZES = ("small", "large")
# cell (row, column) of each position word; rows grow downwards
POSITION_CELLS = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}  # fmt: skip
POSITIONS = tuple(POSITION_CELLS)
CELL_POSITIONS = {cell: name for name, cell in POSITION_CELLS.items()}
RELATIONS = ("left of", "right of", "above", "below")
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUNDS = ("white", "grey", "black", "gradient", "stripes")
MAX_OBJECTS = 3
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}

SYNONYMS = {  # canonical -> other words a prompt may use (same meaning, also accepted by `parse`)
    "cyan": ("turquoise",), "purple": ("violet",), "pink": ("magenta",),
    "circle": ("disc", "disk"), "square": ("box",), "ring": ("donut", "doughnut"),
    "cross": ("plus",), "small": ("little", "tiny"), "large": ("big",),
    "grey": ("gray",), "white": ("light",), "black": ("dark",), "stripes": ("striped",),
}  # fmt: skip
PLURALS = {"box": "boxes", "cross": "crosses", "plus": "pluses"}
POSITION_PHRASES = {  # how captions say a position (parse accepts any filler around the words)
    "top left": ("in the top left corner", "at the top left", "top left", "in the upper left"),
    "top right": ("in the top right corner", "at the top right", "top right", "in the upper right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "bottom left"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "bottom right"),
    "top": ("at the top", "at the top", "top"),
    "bottom": ("at the bottom", "at the bottom", "bottom"),
    "left": ("on the left", "on the left", "left"),
    "right": ("on the right", "on the right", "right"),
    "center": ("in the center", "in the middle", "in the centre", "center"),
}
RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
BACKGROUND_PHRASES = {
    "white": ("on a {} background", "on {}", "against a {} background"),
    "grey": ("on a {} background", "on {}", "against a {} background"),
    "black": ("on a {} background", "on {}", "against a {} background"),
    "gradient": ("on a gradient", "on a gradient background", "against a gradient"),
    "stripes": ("on stripes", "on a striped background", "against stripes"),
}
FILLER = {"a", "an", "the", "in", "at", "on", "of", "to", "corner", "background", "image",
          "picture", "with", "against", "side", "part"}  # articles too: "a" is no count word


# ---------------------------------------------------------------- what a caption means


@dataclass(frozen=True)
class ObjectSpec:
    """`count` identical objects; None = not stated. A position is stated only for one object."""

    shape: str
    colour: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None
    count: int = 1

    def __post_init__(self):
        for name, allowed in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES),
                              ("position", POSITIONS)):  # fmt: skip
            value = getattr(self, name)
            if not (value is None and name != "shape") and value not in allowed:
                raise ValueError(f"ObjectSpec.{name} must be one of {allowed}, got {value!r}")
        if self.count not in (1, 2, 3):
            raise ValueError(f"ObjectSpec.count must be 1, 2 or 3, got {self.count!r}")
        if self.count > 1 and self.position is not None:
            raise ValueError("a position can be stated for a single object only, not a group")


@dataclass(frozen=True)
class SceneSpec:
    """Groups of objects; `relation` r (if any) reads "objects[0] r objects[1]"."""

    objects: tuple = field(default_factory=tuple)
    relation: Optional[str] = None
    background: Optional[str] = None

    def __post_init__(self):
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not objects or not all(isinstance(o, ObjectSpec) for o in objects):
            raise ValueError(f"SceneSpec needs one or more ObjectSpec, got {objects!r}")
        if sum(o.count for o in objects) > MAX_OBJECTS:
            raise ValueError(
                f"a scene holds at most {MAX_OBJECTS} objects, got {sum(o.count for o in objects)}"
            )
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
            if len(objects) != 2 or any(o.count != 1 or o.position for o in objects):
                raise ValueError(
                    "a relation joins exactly two single objects that have no stated position"
                )

    @property
    def count(self) -> int:
        return sum(o.count for o in self.objects)


def cell_relation_holds(relation: str, cell_a, cell_b) -> bool:
    """Does "A relation B" hold for objects in cells (row, column) a and b?"""
    (row_a, col_a), (row_b, col_b) = cell_a, cell_b
    return {
        "left of": col_a < col_b, "right of": col_a > col_b,
        "above": row_a < row_b, "below": row_a > row_b,
    }[relation]  # fmt: skip


def _fits(wanted: ObjectSpec, found, colour_shape_only: bool) -> bool:
    if wanted.shape != found.shape or wanted.colour not in (None, found.colour):
        return False
    if colour_shape_only:
        return True
    position_ok = wanted.position is None or POSITION_CELLS[wanted.position] == found.cell
    return wanted.size in (None, found.size) and position_ok


def satisfies(
    found: Sequence, spec: SceneSpec, background: Optional[str] = None, *,
    exact: bool = True, colour_shape_only: bool = False,
) -> bool:  # fmt: skip
    """Do the objects `found` (anything with .colour .shape .size .cell) show `spec`? (module doc)

    colour_shape_only: only colours and shapes, relations and background ignored (with
    exact=False this is the "colour+shape" score, a caption's objects all present).
    """
    instances = [o for o in spec.objects for _ in range(o.count)]
    if exact and len(found) != len(instances):
        return False
    if not colour_shape_only and spec.background not in (None, background):
        return False
    for chosen in itertools.permutations(found, len(instances)):
        if all(_fits(w, f, colour_shape_only) for w, f in zip(instances, chosen)):
            if colour_shape_only or spec.relation is None:
                return True
            if cell_relation_holds(spec.relation, chosen[0].cell, chosen[1].cell):
                return True
    return False


# ---------------------------------------------------------------- captions


def _word(rng, canonical: str, synonym_prob: float) -> str:
    if rng is not None and canonical in SYNONYMS and rng.random() < synonym_prob:
        options = SYNONYMS[canonical]
        return options[rng.integers(len(options))]
    return canonical


def _plural(word: str) -> str:
    return PLURALS.get(word, word + "s")


def _choice(rng, options):
    return options[0] if rng is None else options[rng.integers(len(options))]


def caption(spec: SceneSpec, rng=None, synonym_prob: float = 0.25) -> str:
    """Words for `spec`; rng=None gives the canonical caption, a numpy Generator a random style
    (synonyms, articles, word orders, joiners, where the background goes). Always parse(caption) ==
    spec: the style never changes the meaning or the order of the objects."""
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"caption expects a SceneSpec, got {type(spec).__name__}")
    terse = rng is not None and rng.random() < 0.15  # "red star top left", as typed in a hurry
    phrases = []
    for obj in spec.objects:
        adjectives = [_word(rng, w, synonym_prob) for w in (obj.size, obj.colour) if w]
        if rng is not None and len(adjectives) == 2 and rng.random() < 0.1:
            adjectives.reverse()  # "a red large star"
        shape = _word(rng, obj.shape, synonym_prob)
        if obj.count > 1:
            digits = rng is not None and rng.random() < 0.2  # "2 red stars"
            number = str(obj.count) if digits else NUMBER_WORDS[obj.count]
            words = [number, *adjectives, _plural(shape)]
        else:
            article = "an" if (adjectives or [shape])[0][0] in "aeiou" else "a"
            words = ([] if terse else [_choice(rng, (article, article, article, "one"))])
            words += [*adjectives, shape]
        phrase = " ".join(words)
        if obj.position:
            where = obj.position if terse else _choice(rng, POSITION_PHRASES[obj.position])
            before = rng is not None and len(spec.objects) == 1 and rng.random() < 0.2
            phrase = f"{where}, {phrase}" if before else f"{phrase} {where}"
        phrases.append(phrase)
    if spec.relation:
        text = f"{phrases[0]} {_choice(rng, RELATION_PHRASES[spec.relation])} {phrases[1]}"
    elif len(phrases) == 1:
        text = phrases[0]
    else:
        last = _choice(rng, (" and ", " and ", ", and ", ", ")) if len(phrases) > 2 else None
        last = last or _choice(rng, (" and ", " and ", " and ", ", "))
        text = ", ".join(phrases[:-1]) + last + phrases[-1]
    if spec.background:
        words = _word(rng, spec.background, synonym_prob)
        where = _choice(rng, BACKGROUND_PHRASES[spec.background]).format(words)
        text = f"{where}, {text}" if rng is not None and rng.random() < 0.3 else f"{text} {where}"
    return text


# ---------------------------------------------------------------- parsing


def _lexicon() -> dict:
    """word tuple -> (kind, value), for every word and multi-word phrase a prompt may use."""
    table = {}
    for kind, words in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES),
                        ("background", BACKGROUNDS)):  # fmt: skip
        for canonical in words:
            for word in (canonical, *SYNONYMS.get(canonical, ())):
                table[(word,)] = (kind, canonical)
                if kind == "shape":
                    table[(_plural(word),)] = ("shapes", canonical)
    table[("gradient",)] = ("background", "gradient")
    table[("stripes",)] = table[("striped",)] = table[("stripy",)] = ("background", "stripes")
    for name in POSITIONS:
        words = tuple(name.split())
        table[words] = ("position", name)
        table[tuple(w.replace("top", "upper") for w in words)] = ("position", name)
        table[tuple(w.replace("bottom", "lower") for w in words)] = ("position", name)
    table[("centre",)] = table[("middle",)] = ("position", "center")
    for relation, phrases in RELATION_PHRASES.items():
        for phrase in phrases:
            table[tuple(phrase.split())] = ("relation", relation)
    for count, words in ((1, ("one", "1")), (2, ("two", "2")), (3, ("three", "3"))):
        for word in words:
            table[(word,)] = ("count", count)
    table[("and",)] = table[(",",)] = ("join", None)
    return table


LEXICON = _lexicon()
LONGEST_PHRASE = max(len(words) for words in LEXICON)


def _tokens(prompt: str) -> list[tuple[str, object, str]]:
    """(kind, value, text) per word or phrase, longest phrase first ("left of" before "left")."""
    words = re.sub(r"[^a-z0-9,]+", " ", prompt.lower().replace(",", " , ")).split()
    tokens, i = [], 0
    while i < len(words):
        for n in range(min(LONGEST_PHRASE, len(words) - i), 0, -1):
            if tuple(words[i : i + n]) in LEXICON:
                kind, value = LEXICON[tuple(words[i : i + n])]
                tokens.append((kind, value, " ".join(words[i : i + n])))
                i += n
                break
        else:
            if words[i] not in FILLER:
                raise ValueError(
                    f"cannot parse prompt {prompt!r}: unknown word {words[i]!r}. Known words: "
                    f"colours {COLOURS}, shapes {SHAPES}, sizes {SIZES}, positions {POSITIONS}, "
                    f"relations {RELATIONS}, counts one/two/three, backgrounds {BACKGROUNDS}"
                )
            i += 1
    return tokens


def parse(prompt: str) -> SceneSpec:
    """Prompt text -> SceneSpec; ValueError naming the problem (unknown word, no shape, ...)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    chunks, relations, current = [], [], []
    for token in _tokens(prompt) + [("join", None, "")]:
        if token[0] in ("join", "relation"):
            if current:
                chunks.append(current)
            current = []
            if token[0] == "relation":
                relations.append((token[1], len(chunks)))  # between chunk n-1 and chunk n
        else:
            current.append(token)
    objects, background, relation, carried, order = [], None, None, [], {}
    for index, chunk in enumerate(chunks):
        kinds = {kind for kind, _, _ in chunk}
        found_background = [value for kind, value, _ in chunk if kind == "background"]
        if len(set(found_background)) > 1 or (found_background and background):
            raise ValueError(f"cannot parse prompt {prompt!r}: more than one background")
        background = background or (found_background[0] if found_background else None)
        chunk = [t for t in chunk if t[0] != "background"]
        if not kinds & {"shape", "shapes"}:
            if {k for k, _, _ in chunk} - {"position"}:
                raise ValueError(f"cannot parse prompt {prompt!r}: "
                                 f"{' '.join(t for _, _, t in chunk)!r} names no shape")
            carried += chunk  # "in the top left corner, a red star": the position comes first
            continue
        order[index] = len(objects)
        objects.append(_object(carried + chunk, prompt))
        carried = []
    if carried:
        raise ValueError(f"cannot parse prompt {prompt!r}: a position that belongs to no shape")
    if not objects:
        raise ValueError(f"cannot parse prompt {prompt!r}: it names no shape {SHAPES}")
    if len(relations) > 1:
        raise ValueError(f"cannot parse prompt {prompt!r}: at most one relation is supported")
    if relations:
        relation, after = relations[0]
        if order.get(after - 1) != 0 or order.get(after) != 1 or len(objects) != 2:
            raise ValueError(
                f"cannot parse prompt {prompt!r}: a relation must join two objects, "
                "as in 'a red star left of a blue ring'"
            )
    try:
        return SceneSpec(tuple(objects), relation, background)
    except ValueError as error:
        raise ValueError(f"cannot parse prompt {prompt!r}: {error}") from None


def _object(chunk, prompt: str) -> ObjectSpec:
    found = {}
    for kind, value, text in chunk:
        kind = {"shapes": "shape"}.get(kind, kind)
        if kind in found and found[kind] != value:
            raise ValueError(f"cannot parse prompt {prompt!r}: two {kind}s ({found[kind]!r}, "
                             f"{value!r}) for one object")  # fmt: skip
        found[kind] = value
    plural = any(kind == "shapes" for kind, _, _ in chunk)
    count = found.get("count", 1)
    if plural and count == 1:
        raise ValueError(f"cannot parse prompt {prompt!r}: say how many {found['shape']}s "
                         "(two or three)")  # fmt: skip
    return ObjectSpec(found["shape"], found.get("colour"), found.get("size"),
                      found.get("position"), count)  # fmt: skip


def caption_vocabulary() -> dict[str, tuple[str, ...]]:
    """Every word a v2 caption or prompt may use, by kind: what a model trained on these scenes
    knows (its card, minisd/card.py, names the rest as unknown)."""
    kinds = {"colour": "colours", "shape": "shapes", "shapes": "shapes", "size": "sizes",
             "background": "backgrounds", "position": "positions", "relation": "relations",
             "count": "counts"}  # fmt: skip
    vocabulary: dict[str, set] = {name: set() for name in kinds.values()}
    vocabulary["other words"] = set(FILLER)
    for words, (kind, _) in LEXICON.items():
        target = vocabulary[kinds[kind]] if kind in kinds else vocabulary["other words"]
        target.update(w for w in words if w.isalpha())
    return {kind: tuple(sorted(words)) for kind, words in vocabulary.items()}
