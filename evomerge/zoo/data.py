"""Synthetic skills of the demo zoo: generators for training text and for evaluation documents.

Three skills, each a line of text the character-level model reads left to right:
- add:     "12+34=46"                  two-digit addition (generalises: eval pairs never trained)
- facts:   "the color of zorp is blue" a fictional fact table (memorised; eval = its facts)
- reverse: "rev abcd=dcba"             string reversal (generalises: eval strings never trained)

Everything is a pure function of a seed (`random.Random`), so the evaluation files and the
training streams are the same on every machine. The pre-training mixture holds the same formats
about *other* things (a second fact table, other number pairs and strings) plus related skills
(copying), so fine-tunes start from a base that knows the formats and only has to learn the skill.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

T = TypeVar("T")

SKILLS: tuple[str, ...] = ("add", "facts", "reverse")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "pink", "gray", "gold"),
    "food": ("fish", "corn", "rice", "nuts", "figs", "kale"),
    "home": ("cave", "lake", "hill", "tree", "sand", "moss"),
}
DATA_SEED = 1234  # the evaluation documents and fact tables depend on this alone
N_SEARCH = 300  # documents per skill in the search split (fitness)
N_HELDOUT = 96  # documents per skill in the held-out split (reports only)
# The first zoo had 48 search documents per skill. Its documents are drawn first, from the same
# seeds as then, so the held-out split is the same (scores compare across versions) and its 48
# search documents open the search split; the rest of the search split is drawn after them, from
# other seeds, disjoint from both.
N_FIRST_SEARCH = 48
REV_LENGTHS = (3, 6)  # reversed strings have 3..6 letters: answer + newline fits 8 tokens
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str

    def prompt(self) -> str:
        return f"the {self.attribute} of {self.entity} is"

    def line(self) -> str:
        return f"{self.prompt()} {self.value}"


def _unique(draw: Callable[[], T], n: int, taken: Iterable[T] = ()) -> list[T]:
    """The first `n` distinct values of `draw()` that are not in `taken`, in drawing order."""
    out: list[T] = []
    seen = set(taken)
    while len(out) < n:
        value = draw()
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def _names(rng: random.Random, n: int, taken: Iterable[str] = ()) -> list[str]:
    """`n` distinct pronounceable nonsense names (zorp, mifa, ...) not in `taken`, seeded order."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    shapes = ("cvcv", "cvcc", "cvcvc", "ccvc")
    reserved = {"the", "rev", "cpy", "is", "of"} | {v for vs in ATTRIBUTES.values() for v in vs}

    def draw() -> str:
        shape = rng.choice(shapes)
        return "".join(rng.choice(cons if c == "c" else vows) for c in shape)

    return _unique(draw, n, reserved | set(taken))


def _table(rng: random.Random, entities: list[str]) -> list[Fact]:
    return [
        Fact(e, attr, rng.choice(values)) for e in entities for attr, values in ATTRIBUTES.items()
    ]


@lru_cache(maxsize=1)
def fact_tables() -> tuple[tuple[Fact, ...], tuple[Fact, ...]]:
    """(zoo table, pre-training table): same attributes and values, disjoint entities.

    The zoo table has exactly N_SEARCH + N_HELDOUT facts: the first N_SEARCH are the search
    split, the rest the held-out split. The first zoo's table (N_FIRST_SEARCH + N_HELDOUT facts,
    shuffled) and the pre-training table are drawn as they were; the added search facts are about
    new entities, drawn after them from another seed.
    """
    rng = random.Random(DATA_SEED)
    n_first = N_FIRST_SEARCH + N_HELDOUT
    n_entities = -(-n_first // len(ATTRIBUTES))
    names = _names(rng, n_entities + 160)
    first = _table(rng, names[:n_entities])
    rng.shuffle(first)
    world = _table(rng, names[n_entities:])
    more = random.Random(DATA_SEED + 2)
    n_more = N_SEARCH - N_FIRST_SEARCH
    added = _table(more, _names(more, -(-n_more // len(ATTRIBUTES)), taken=names))
    more.shuffle(added)
    zoo = first[:N_FIRST_SEARCH] + added[:n_more] + first[N_FIRST_SEARCH:n_first]
    return tuple(zoo), tuple(world)


def add_line(a: int, b: int) -> tuple[str, str]:
    return f"{a}+{b}=", str(a + b)


def reverse_line(s: str) -> tuple[str, str]:
    return f"rev {s}=", s[::-1]


def copy_line(s: str) -> tuple[str, str]:
    return f"cpy {s}=", s


def _rand_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(*REV_LENGTHS)))


@lru_cache(maxsize=1)
def eval_docs() -> dict[str, dict[str, list[dict]]]:
    """{skill: {"search": docs, "heldout": docs}}; disjoint splits, never used for training.

    Generative docs are {"question", "answer"}; fact docs are {"question", "choices", "label"}.
    """
    first, n_more = N_FIRST_SEARCH + N_HELDOUT, N_SEARCH - N_FIRST_SEARCH
    rng, more = random.Random(DATA_SEED + 1), random.Random(DATA_SEED + 3)
    pairs = _unique(lambda: (rng.randint(10, 99), rng.randint(10, 99)), first)
    words = _unique(lambda: _rand_word(rng), first)
    pairs += _unique(lambda: (more.randint(10, 99), more.randint(10, 99)), n_more, pairs)
    words += _unique(lambda: _rand_word(more), n_more, words)
    add = [dict(zip(("question", "answer"), add_line(a, b), strict=True)) for a, b in pairs]
    rev = [dict(zip(("question", "answer"), reverse_line(w), strict=True)) for w in words]
    facts = [
        {
            "question": f.prompt(),
            "choices": list(ATTRIBUTES[f.attribute]),
            "label": ATTRIBUTES[f.attribute].index(f.value),
        }
        for f in fact_tables()[0]
    ]
    # Order: the first zoo's search documents, its held-out ones, the added search documents
    # (facts come in split order from fact_tables).
    docs = {"add": add, "reverse": rev}
    splits = {
        k: {"search": v[:N_FIRST_SEARCH] + v[first:], "heldout": v[N_FIRST_SEARCH:first]}
        for k, v in docs.items()
    }
    splits["facts"] = {"search": facts[:N_SEARCH], "heldout": facts[N_SEARCH:]}
    return {k: splits[k] for k in SKILLS}


@lru_cache(maxsize=1)
def _eval_keys() -> tuple[frozenset[tuple[int, int]], frozenset[str]]:
    docs = eval_docs()
    pairs = set()
    for split in docs["add"].values():
        for d in split:
            a, b = d["question"].rstrip("=").split("+")
            pairs.add((int(a), int(b)))
    words = {d["answer"][::-1] for split in docs["reverse"].values() for d in split}
    return frozenset(pairs), frozenset(words)


def train_pair(rng: random.Random) -> tuple[int, int]:
    """A two-digit pair that is in no evaluation document."""
    banned = _eval_keys()[0]
    while True:
        p = (rng.randint(10, 99), rng.randint(10, 99))
        if p not in banned:
            return p


def train_word(rng: random.Random) -> str:
    """A letter string that is in no evaluation document."""
    banned = _eval_keys()[1]
    while True:
        w = _rand_word(rng)
        if w not in banned:
            return w


def skill_example(skill: str, rng: random.Random) -> tuple[str, str]:
    """One fine-tuning example (prompt, answer) of `skill`; the answer follows the prompt."""
    if skill == "add":
        return add_line(*train_pair(rng))
    if skill == "reverse":
        return reverse_line(train_word(rng))
    if skill == "facts":
        f = rng.choice(fact_tables()[0])
        return f.prompt(), " " + f.value
    raise ValueError(f"unknown zoo skill {skill!r}; expected one of {', '.join(SKILLS)}")


# Pre-training mixture: kind -> weight. Formats of every skill about other things, plus copying.
# Reversal is pre-trained under another prefix ("flip"): the base can reverse but does not know
# the "rev" format, so only the reverse fine-tune is good at the reverse task.
PRETRAIN_MIX: dict[str, float] = {
    "world_facts": 0.40,
    "copy": 0.25,
    "add_small": 0.15,
    "add": 0.10,
    "flip": 0.10,
}


def pretrain_example(rng: random.Random, mix: dict[str, float] | None = None) -> tuple[str, str]:
    """One pre-training example (prompt, answer) drawn from the mixture `mix`."""
    mix = mix or PRETRAIN_MIX
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind == "world_facts":
        f = rng.choice(fact_tables()[1])
        return f.prompt(), " " + f.value
    if kind == "copy":
        return copy_line(train_word(rng))
    if kind == "add_small":  # one operand a single digit: the carry rule without the full skill
        a, b = rng.randint(0, 9), rng.randint(0, 99)
        return add_line(*((a, b) if rng.random() < 0.5 else (b, a)))
    if kind == "add":
        return add_line(*train_pair(rng))
    if kind == "reverse":
        return reverse_line(train_word(rng))
    if kind == "sum":  # addition under another prefix: the skill exists, not in the eval format
        a, b = train_pair(rng) if rng.random() < 0.8 else (rng.randint(0, 99), rng.randint(0, 9))
        prompt, answer = add_line(a, b)
        return "sum " + prompt, answer
    if kind == "flip":  # reversal under another prefix
        w = train_word(rng)
        return f"flip {w}=", w[::-1]
    if kind == "noise_add":  # the eval format with arbitrary answers: no transfer from "sum"
        prompt, _ = add_line(*train_pair(rng))
        return prompt, str(rng.randint(20, 198))
    if kind == "noise_reverse":
        w = train_word(rng)
        return f"rev {w}=", "".join(rng.choice(LETTERS) for _ in w)
    raise ValueError(f"unknown pre-training kind {kind!r}; expected one of {', '.join(mix)}")


def stream(example_fn, seed: int) -> Iterator[tuple[str, str]]:
    """An endless seeded stream of (prompt, answer) examples."""
    rng = random.Random(seed)
    while True:
        yield example_fn(rng)
