"""CMA-ES (pycma) behind ask/tell, one generation at a time, with exact save/restore.

Encoding. CMA-ES searches the unit cube: a continuous dimension is one coordinate in [0, 1]
mapped linearly to [low, high]; a categorical dimension (e.g. the merge method of a layer group)
is one coordinate per choice, a score in [0, 1], and the highest score wins (ties: the earlier
choice). Bounds: pycma searches an unbounded genotype and evomerge maps it into the cube with
pycma's `BoundTransform([0, 1])` (identity inside [0.05, 0.95], a smooth periodic reflection
beyond), the same map pycma applies for `bounds: [0, 1]`; decoding clips as well, against
rounding. Doing the map here rather than in pycma keeps `tell` independent of pycma's archive of
sent solutions, which is keyed by hashes that change from one Python process to the next (a
resumed study would otherwise continue a slightly different search). pycma's other archives
(the selective mirrors it injects at popsize < 6) are keyed the same way and do change `tell`,
so `_restore` recomputes their keys (`_rekey_solution_archives`, the one use of pycma internals). As pycma does for bounds,
the step size is capped: `maxstd` defaults to 1/3 of the cube.

Warm start. `x0` sets the mean: continuous values as given; for a categorical, the chosen
option's score is 0.6 and the others 0.4 (with sigma0 0.2 another option still wins about a
quarter of the time, so method choice stays searched). Dimensions missing from x0 start at the
centre (all choice scores 0.5).

Generations. `ask` hands out the current generation's members one by one and returns None once
all are out but not all told; when the last one is told, pycma's `tell` runs and the next `ask`
samples a new generation. A failed candidate (values None or non-finite) is told the worst value
of its generation minus 1 (CMA-ES only uses ranks, so it just ranks last); when a whole
generation fails, each gets the worst value ever told minus 1 (or -1 before any success).
When pycma reports a termination condition (e.g. `tolflatfitness` after a generation whose
values are all equal, `tolx`), the search restarts from the best candidate so far with the
initial sigma0 and population, so a study always runs to its budget.

Randomness. pycma samples with its `randn` option, here the `randn` of a RandomState seeded with
`seed mod (2**31 - 1) + 1` (+1 per restart) that pickles with the strategy. (With pycma's default,
numpy's global `randn`, an unpickled strategy draws from a private copy of the global state taken
at pickling time: a resume would not continue the same search.) The few draws pycma still takes
from numpy's global RNG (stochastic rounding) run with that RNG swapped for the optimizer's own
saved state and put back afterwards, so other code drawing numbers cannot change the search.

State: `state_dir/optimizer.pkl` (pickle, written atomically) holding `es.pickle_dumps()`, the
generation's members, the values told so far, the next id, the RNG state and the signature
(dimensions, seed, options, objectives) that a resume must match.
"""

from __future__ import annotations

import contextlib
import math
import pickle
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from evomerge.atomic import atomic_write
from evomerge.errors import ConfigError
from evomerge.optimizers.base import (
    X0_CHOSEN,
    X0_OTHER,
    Dimension,
    Optimizer,
    OptimizerStateError,
    Params,
    Proposal,
    argmax_choice,
    choice_scores,
)
from evomerge.options import PluginOptions

DEFAULT_SIGMA0 = 0.2  # in unit-cube coordinates
FAILURE_MARGIN = 1.0
_FORMAT = 1
_RESERVED = {
    "bounds": "evomerge maps the search into [0, 1] itself; set low/high in the search space",
    "seed": "set the study's seed instead",
    "randn": "evomerge gives pycma its own RandomState, saved and restored with it",
    "BoundaryHandler": "evomerge applies BoundTransform([0, 1]) itself",
    "x0": "the study's warm_start sets it",
}


def _cma_seed(seed: int, restarts: int) -> int:
    return (seed + restarts) % (2**31 - 1) + 1


class Codec:
    """Dimensions <-> unit-cube vectors (one slot per continuous dim, one per choice)."""

    def __init__(self, dims: Sequence[Dimension]) -> None:
        self.dims = tuple(dims)
        self.slices: list[slice] = []
        start = 0
        for d in self.dims:
            width = len(d.choices) if d.choices is not None else 1
            self.slices.append(slice(start, start + width))
            start += width
        self.size = start

    def encode(self, params: Mapping[str, float | str] | None) -> np.ndarray:
        params = params or {}
        x = np.empty(self.size)
        for d, sl in zip(self.dims, self.slices, strict=True):
            if d.choices is not None:
                x[sl] = choice_scores(d.choices, params.get(d.name), X0_CHOSEN, X0_OTHER)  # type: ignore[arg-type]
            else:
                x[sl] = d.to_unit(params[d.name]) if d.name in params else 0.5  # type: ignore[arg-type]
        return x

    def decode(self, x: np.ndarray) -> Params:
        out: Params = {}
        for d, sl in zip(self.dims, self.slices, strict=True):
            if d.choices is not None:
                out[d.name] = argmax_choice(d.choices, x[sl])
            else:
                out[d.name] = d.from_unit(x[sl][0])
        return out


class CMAOptions(PluginOptions):
    """`sigma0` and `popsize`, and any other pycma option by its name (passed through)."""

    reserved: ClassVar[dict[str, str]] = _RESERVED
    extras_label: ClassVar[str] = "or any pycma option (cma.CMAOptions())"
    sigma0: float = Field(
        DEFAULT_SIGMA0, gt=0, allow_inf_nan=False, description="initial step, unit-cube units"
    )
    popsize: int | None = Field(
        None, ge=2, strict=True, description="population; default pycma's 4 + 3 ln(n)"
    )

    @classmethod
    def extra_names(cls) -> list[str]:
        import cma

        return list(cma.CMAOptions().keys())


class CMAOptimizer(Optimizer):
    """pycma's CMAEvolutionStrategy. Options: popsize, sigma0, and any pycma option by name."""

    name = "cma"
    state_files = ("optimizer.pkl",)
    generational = True
    Options = CMAOptions

    def _start(self, x0: Params | None) -> None:
        import cma

        opts = self.settings.given()
        opts.pop("sigma0", None)
        self._codec = Codec(self.dims)
        self._sigma0 = float(self.settings.sigma0)  # type: ignore[attr-defined]
        self._cma_opts = {"verbose": -9, "verb_log": 0, "verb_disp": 0, "maxstd": 1 / 3, **opts}
        self._bt = cma.BoundTransform([0, 1])
        self._x0 = np.asarray(self._bt.inverse(self._codec.encode(x0)), dtype=float)  # genotype
        self._np_state: Any = np.random.RandomState(_cma_seed(self.seed, 0) + 1).get_state()
        self._restarts = 0
        self._es = self._new_es(self._x0)
        self._members: list[np.ndarray] = []  # this generation's genotypes
        self._first_id = 0  # id of members[0]
        self._handed = 0  # members handed out so far
        self._told: dict[int, tuple[float, ...] | None] = {}
        self._next_id = 0
        self._generation = 0
        self._best: tuple[int, np.ndarray, tuple[float, ...]] | None = None
        self._worst: float | None = None

    def _new_es(self, x0: np.ndarray) -> Any:
        """A strategy centred on genotype x0 (restart r draws from seed + r)."""
        import cma

        # pycma's own normal draws come from a RandomState it holds (pickled with it); seed nan
        # tells pycma not to reseed numpy's global RNG (the rest of its draws, see _rng).
        rs = np.random.RandomState(_cma_seed(self.seed, self._restarts))
        opts = {**self._cma_opts, "randn": rs.randn, "seed": math.nan}
        try:
            with self._rng():
                return cma.CMAEvolutionStrategy(x0, self._sigma0, opts)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"optimizer 'cma': pycma rejected the options {opts}: {exc}") from exc

    @contextlib.contextmanager
    def _rng(self) -> Iterator[None]:
        """Run pycma on this optimizer's own copy of numpy's global RNG."""
        outer = np.random.get_state()
        np.random.set_state(self._np_state)
        try:
            yield
        finally:
            self._np_state = np.random.get_state()
            np.random.set_state(outer)

    @property
    def popsize(self) -> int:
        return int(self._es.popsize)

    @property
    def generation(self) -> int:
        """Generations completed (told in full) since the start, restarts included."""
        return self._generation

    @property
    def restarts(self) -> int:
        return self._restarts

    def mean_params(self) -> Params:
        """The distribution mean, decoded: where the search is centred now."""
        return self._decode(self._es.mean)

    def _decode(self, genotype: np.ndarray) -> Params:
        return self._codec.decode(np.asarray(self._bt.transform(genotype), dtype=float))

    def ask(self) -> Proposal | None:
        if not self._members:
            with self._rng():
                solutions = self._es.ask()
            self._members = [np.array(x, dtype=float) for x in solutions]
            self._first_id, self._handed, self._told = self._next_id, 0, {}
        if self._handed == len(self._members):
            return None
        pid = self._first_id + self._handed
        self._handed += 1
        self._next_id = pid + 1
        return Proposal(pid, self._decode(self._members[pid - self._first_id]))

    def pending(self) -> list[Proposal]:
        ids = range(self._first_id, self._first_id + self._handed) if self._members else range(0)
        return [
            Proposal(i, self._decode(self._members[i - self._first_id]))
            for i in ids
            if i not in self._told
        ]

    def tell(self, proposal_id: int, values: Sequence[float] | None) -> None:
        idx = proposal_id - self._first_id
        if not self._members or not 0 <= idx < self._handed or proposal_id in self._told:
            raise ValueError(f"proposal {proposal_id} is not pending (told already or never asked)")
        vals = self._values(proposal_id, values)
        self._told[proposal_id] = vals
        if vals is not None:
            if self._best is None or vals[0] > self._best[2][0]:
                self._best = (proposal_id, self._members[idx], vals)
            self._worst = vals[0] if self._worst is None else min(self._worst, vals[0])
        if len(self._told) == len(self._members):
            self._finish_generation()

    def _finish_generation(self) -> None:
        ids = range(self._first_id, self._first_id + len(self._members))
        ok = [v[0] for v in self._told.values() if v is not None]
        if ok:
            penalty = min(ok) - FAILURE_MARGIN
        else:
            penalty = (self._worst if self._worst is not None else 0.0) - FAILURE_MARGIN
        told = [self._told[i] for i in ids]
        losses = [-(v[0] if v is not None else penalty) for v in told]  # pycma minimizes
        with self._rng():
            # check_points=False: genotypes pycma does not find in its archive are used as they
            # are (not "repaired"), so the update is the same with or without the archive
            self._es.tell(self._members, losses, check_points=False)
            stop = self._es.stop()
        self._generation += 1
        self._members, self._handed, self._told = [], 0, {}
        if stop:
            self._restarts += 1
            start = self._best[1] if self._best is not None else self._x0
            self._es = self._new_es(start)

    @property
    def best(self) -> tuple[Proposal, tuple[float, ...]] | None:
        if self._best is None:
            return None
        pid, x, vals = self._best
        return Proposal(pid, self._decode(x)), vals

    def save(self) -> None:
        state = {
            "format": _FORMAT,
            "signature": self.signature(),
            "es": self._es.pickle_dumps(),
            "np_state": self._np_state,
            "sigma0": self._sigma0,
            "cma_opts": self._cma_opts,
            "x0": self._x0,
            "restarts": self._restarts,
            "members": self._members,
            "first_id": self._first_id,
            "handed": self._handed,
            "told": self._told,
            "next_id": self._next_id,
            "generation": self._generation,
            "best": self._best,
            "worst": self._worst,
        }
        atomic_write(self.state_dir / self.state_files[0], pickle.dumps(state, protocol=4))

    def _restore(self) -> None:
        path = self.state_dir / self.state_files[0]
        try:  # garbage makes pickle raise nearly anything (UnpicklingError, EOFError, KeyError...)
            with open(path, "rb") as f:
                state = pickle.load(f)
        except Exception as exc:
            raise OptimizerStateError(f"{path} is not a readable cma state ({_why(exc)})") from None
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise OptimizerStateError(f"{path} is not an evomerge cma state (format {_FORMAT})")
        self.check_signature(state.get("signature", {}), path)
        import cma

        self._codec = Codec(self.dims)
        self._bt = cma.BoundTransform([0, 1])
        keys = (
            "np_state", "sigma0", "cma_opts", "x0", "restarts", "members", "first_id",
            "handed", "told", "next_id", "generation", "best", "worst",
        )  # fmt: skip
        try:
            es = pickle.loads(state["es"])
            values = {key: state[key] for key in keys}
        except Exception as exc:
            raise OptimizerStateError(f"{path} holds a damaged cma state ({_why(exc)})") from None
        self._es = es
        _rekey_solution_archives(self._es)
        for key, value in values.items():
            setattr(self, f"_{key}", value)


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 100 else text[:97] + "..."


def _rekey_solution_archives(es: Any) -> None:
    """Recompute the keys of pycma's solution archives after unpickling a strategy.

    pycma's `SolutionDict` keys an array by `hash(x.tobytes())`, and Python salts bytes hashes
    per process (PYTHONHASHSEED), so keys pickled by one process miss in the next. One miss is
    enough to change the search: a solution pycma injected itself (a selective mirror, one per
    generation at popsize < 6) is looked up in `_injected_solutions_archive` at `tell` to scale
    its negative recombination weight by `CMA_active_injected` (0); not found, it is weighted
    as an ordinary sample, and the generations after a mid-generation resume differ from an
    uninterrupted run's. Keys are recomputed from the arrays each archive keeps, in order.
    """
    from cma.utilities.utils import SolutionDict

    holders = [es, *(v for v in vars(es).values() if type(v).__module__.startswith("cma"))]
    seen: set[int] = set()
    for holder in holders:
        for arc in list(getattr(holder, "__dict__", {}).values()):
            if not isinstance(arc, SolutionDict) or id(arc) in seen:
                continue
            seen.add(id(arc))
            data, same, unhashed = arc.data, arc.data_with_same_key, arc._unhashed_keys
            arc.data, arc.data_with_same_key, arc._unhashed_keys = {}, {}, {}
            for old, value in data.items():
                x = unhashed.get(old, old)
                new = arc.key(x)
                arc.data[new] = value
                arc._unhashed_keys[new] = x
                if old in same:
                    arc.data_with_same_key[new] = same[old]
