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
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

SKILLS: tuple[str, ...] = ("add", "facts", "reverse")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "pink", "gray", "gold"),
    "food": ("fish", "corn", "rice", "nuts", "figs", "kale"),
    "home": ("cave", "lake", "hill", "tree", "sand", "moss"),
}
DATA_SEED = 1234  # the evaluation documents and fact tables depend on this alone
N_SEARCH = 48  # documents per skill in the search split (fitness)
N_HELDOUT = 96  # documents per skill in the held-out split (reports only)
# Extra search documents per generative skill, so that full-fidelity fitness costs something and
# racing has items to save: 48 items overfit (add 0.229 on search vs 0.062 held-out). Drawn after
# the first N_SEARCH + N_HELDOUT and, like them, never trained on, so the search split measures
# the skill as held-out does. facts keeps its 48: its fine-tune memorised exactly the zoo table.
N_SEARCH_EXTRA: dict[str, int] = {"add": 252, "reverse": 252}


def n_search(skill: str) -> int:
    """Documents of `skill` in the search split."""
    return N_SEARCH + N_SEARCH_EXTRA.get(skill, 0)


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


def _names(rng: random.Random, n: int) -> list[str]:
    """`n` distinct pronounceable nonsense names (zorp, mifa, ...), in a seeded order."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    shapes = ("cvcv", "cvcc", "cvcvc", "ccvc")
    reserved = {"the", "rev", "cpy", "is", "of"} | {v for vs in ATTRIBUTES.values() for v in vs}
    out: list[str] = []
    seen: set[str] = set(reserved)
    while len(out) < n:
        shape = rng.choice(shapes)
        name = "".join(rng.choice(cons if c == "c" else vows) for c in shape)
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _table(rng: random.Random, entities: list[str]) -> list[Fact]:
    return [
        Fact(e, attr, rng.choice(values)) for e in entities for attr, values in ATTRIBUTES.items()
    ]


@lru_cache(maxsize=1)
def fact_tables() -> tuple[tuple[Fact, ...], tuple[Fact, ...]]:
    """(zoo table, pre-training table): same attributes and values, disjoint entities.

    The zoo table has exactly N_SEARCH + N_HELDOUT facts, shuffled; the first N_SEARCH are the
    search split, the rest the held-out split.
    """
    rng = random.Random(DATA_SEED)
    n_zoo = -(-(N_SEARCH + N_HELDOUT) // len(ATTRIBUTES))
    names = _names(rng, n_zoo + 160)
    zoo = _table(rng, names[:n_zoo])
    rng.shuffle(zoo)
    world = _table(rng, names[n_zoo:])
    return tuple(zoo[: N_SEARCH + N_HELDOUT]), tuple(world)


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
    rng = random.Random(DATA_SEED + 1)
    n = N_SEARCH + N_HELDOUT
    pairs: list[tuple[int, int]] = []
    seen_pairs: set[tuple[int, int]] = set()
    while len(pairs) < n:
        p = (rng.randint(10, 99), rng.randint(10, 99))
        if p not in seen_pairs:
            seen_pairs.add(p)
            pairs.append(p)
    words: list[str] = []
    seen_words: set[str] = set()
    while len(words) < n:
        w = _rand_word(rng)
        if w not in seen_words:
            seen_words.add(w)
            words.append(w)
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
    docs = {"add": add, "facts": facts, "reverse": rev}
    extra = _extra_search_docs(rng, seen_pairs, seen_words)
    return {
        k: {"search": v[:N_SEARCH] + extra.get(k, []), "heldout": v[N_SEARCH:n]}
        for k, v in docs.items()
    }


def _extra_search_docs(
    rng: random.Random, seen_pairs: set[tuple[int, int]], seen_words: set[str]
) -> dict[str, list[dict]]:
    """N_SEARCH_EXTRA more add and reverse documents, none equal to an earlier one."""
    pairs: list[tuple[int, int]] = []
    while len(pairs) < N_SEARCH_EXTRA["add"]:
        p = (rng.randint(10, 99), rng.randint(10, 99))
        if p not in seen_pairs:
            seen_pairs.add(p)
            pairs.append(p)
    words: list[str] = []
    while len(words) < N_SEARCH_EXTRA["reverse"]:
        w = _rand_word(rng)
        if w not in seen_words:
            seen_words.add(w)
            words.append(w)
    return {
        "add": [dict(zip(("question", "answer"), add_line(a, b), strict=True)) for a, b in pairs],
        "reverse": [dict(zip(("question", "answer"), reverse_line(w), strict=True)) for w in words],
    }


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
