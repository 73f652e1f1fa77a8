"""Choosing an implementation by timing it, as cuDNN's benchmark mode does.

The first time a kind of work meets a new key (attention of a given shape and dtype, a matrix
product of given shapes), `Autotuner.choose` times every candidate on this machine, keeps the
fastest and logs the choice once. Later calls with that key return the choice from memory.
Choices can be written to a cache file keyed by the machine (CPU, threads, GPU, library versions),
so the next run on the same machine starts with them, and they are saved with a run's checkpoints,
so a resumed run computes exactly as it did before it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from openmae import hardware

Candidates = dict[str, Callable[[], object]]  # name -> runs the work once (or a `Scouted`)
# Timers get the candidates and a count of the keys timed so far (`Autotuner.measurements`): a run
# that raises it timed another key inside (a choice nested in it, e.g. the products inside an
# attention kernel), so its seconds are not its own, and the choice's handicaps (which the rounds
# weigh as the choice will). They return seconds per run, per name.
Timer = Callable[[Candidates, Callable[[], int], dict[str, float]], dict[str, float]]

# Timing budget per key, first runs and scouts included: rounds past the timed runs a candidate needs
# (below) run only while it lasts; those timed runs are made whatever they cost.
BUDGET_S = 0.3
# A candidate must beat the ones listed before it (the plainer paths come first) by more than this
# share to be chosen: smaller differences are the measuring noise, and the plain path wins them.
NOISE = 0.03


# A candidate this many times slower than the fastest after a timed round cannot win: it is not run
# again (native bf16 products on a CPU without bf16 units take 8-60x the fp32 path's time, up to
# seconds a run at ViT-B sizes).
HOPELESS = 2.0
# After two timed runs, a candidate this many times slower than the fastest leaves the rounds too:
# the best of two runs is past the machine's jitter, and a third run could only move it by that.
CLEARLY_SLOWER = 1.25
# Timed runs a candidate gets before the rounds may stop; runs of `TRUSTED_FIRST_RUN_S` or more
# (tens of milliseconds: scheduling hiccups are averaged over within a run) get `LONG_TIMED_RUNS`.
TIMED_RUNS = 3
LONG_TIMED_RUNS = 2
# On a CPU a first (untimed) run this long is a measurement too: its first-call costs (allocation,
# oneDNN primitive creation: a millisecond for a product, up to ~20 ms measured for a first attention
# call) are a small part of it, so a candidate whose first run alone is HOPELESS times the shortest
# first run is not run again at all.
TRUSTED_FIRST_RUN_S = 0.05
# A `Scouted` candidate whose scout, scaled up, estimates it this many times HOPELESS slower than the
# shortest first run of the others is not run at all: an extrapolation, so a wider margin than a run's.
SCOUT_MARGIN = 2.0


@dataclass(frozen=True)
class Scouted:
    """A candidate that can be sized up on a slice of its work first: `scout` runs `1 / scale` of it
    (e.g. a matrix product on a 256th of its rows), `wider`, where given, twice that slice. On a CPU,
    a candidate whose scouts estimate it far slower than the others' full runs is never run in full
    (a native bf16 product of ViT-B's decoder MLP takes ~8 s forward and backward on a CPU without
    bf16 units; its scout ~0.1 s)."""

    run: Callable[[], object]
    scout: Callable[[], object]
    scale: float
    wider: Callable[[], object] | None = None

    def __call__(self) -> object:
        return self.run()


def time_candidates(
    candidates: Candidates,
    keys_timed: Callable[[], int] = lambda: 0,
    handicaps: dict[str, float] | None = None,
    budget_s: float = BUDGET_S,
) -> dict[str, float]:
    """Best seconds per run of each candidate: one untimed run each, then rounds that run every
    candidate once (so drift in the machine's speed is shared) until each has `TIMED_RUNS` timed
    runs (`LONG_TIMED_RUNS` when a run is long) and the budget, counted from the first of the first
    runs, is spent (at most 20 rounds). The minimum is the least noisy estimate of what a run costs.
    A candidate `HOPELESS` times slower than the fastest leaves the rounds, and so does one
    `CLEARLY_SLOWER` after two timed runs; the rounds end when one candidate is left.

    On a CPU (`_first_runs_are_measurements`) a first run of `TRUSTED_FIRST_RUN_S` or more counts
    as a timed run, and one `HOPELESS` times the shortest first run is not run again; a `Scouted`
    candidate is sized up by its scout after the others' first runs, and an estimate `SCOUT_MARGIN`
    times beyond hopeless stands for its runs. A first run that timed other keys inside
    (`keys_timed` rose) is run again, and that second run is a timed one.

    In the rounds a candidate's seconds are weighed with its handicap, as the choice weighs them:
    otherwise noise could put the plain candidate `CLEARLY_SLOWER` than a handicapped one after two
    runs, end its rounds, and hand the choice to the handicapped one (measured: base fp32's decoder
    attention took `per_head` in 2 of 4 processes, while it runs at SDPA's speed)."""
    started = time.perf_counter()
    trusted = _first_runs_are_measurements()
    best = dict.fromkeys(candidates, float("inf"))
    timed_runs = dict.fromkeys(candidates, 0)
    scouted = {name: run for name, run in candidates.items() if trusted and isinstance(run, Scouted)}
    first: dict[str, float] = {}
    for name, run in candidates.items():
        if name not in scouted:
            first[name], timed_runs[name] = _own_seconds(run, keys_timed)
    for name, candidate in scouted.items():
        shortest = min(first.values(), default=float("inf"))
        estimate = _scout_estimate(candidate, keys_timed, shortest)
        if _rules_out(estimate, shortest):
            best[name] = estimate
        else:
            first[name], timed_runs[name] = _own_seconds(candidate, keys_timed)
    for name, seconds in first.items():
        if timed_runs[name] or (trusted and seconds >= TRUSTED_FIRST_RUN_S):
            best[name], timed_runs[name] = seconds, 1
    shortest = min(first.values())
    racing = {
        name: candidates[name] for name in first if best[name] <= HOPELESS * shortest or not timed_runs[name]
    }
    for _ in range(20):
        for name, run in racing.items():
            best[name] = min(best[name], _seconds(run))
            timed_runs[name] += 1
        weighed = {name: seconds * (1 + (handicaps or {}).get(name, 0.0)) for name, seconds in best.items()}
        fastest = min(weighed.values())
        racing = {
            name: run for name, run in racing.items() if not _beaten(name, weighed, timed_runs, fastest)
        }
        if len(racing) == 1:  # the rest are out: more runs of the leader cannot change the choice
            break
        timed_enough = all(timed_runs[name] >= _timed_runs_needed(best[name]) for name in racing)
        if timed_enough and time.perf_counter() - started > budget_s:
            break
    return best


def _rules_out(estimate: float, shortest: float) -> bool:
    """Whether a scout's estimate rules its candidate out against the shortest first run."""
    return estimate >= TRUSTED_FIRST_RUN_S and estimate > SCOUT_MARGIN * HOPELESS * shortest


def _scout_estimate(candidate: Scouted, keys_timed: Callable[[], int], shortest: float) -> float:
    """The scout's seconds scaled up to its candidate's work. A scout's first run is cold: its
    first-call costs (new kernels, allocations; 20 ms and more for a first attention call) get
    scaled up too. So a cold run shorter than `TRUSTED_FIRST_RUN_S` whose estimate would rule the
    candidate out is run again, and the faster run counts.

    A warm run has fixed costs too, which do not grow with the work (autograd, dispatch, a kernel's
    setup: ~0.5 ms for a product forward and backward). Scaled up with the work they can make a fast
    candidate look hopeless: on an AVX512-BF16 CPU the 33-row scout of a native bf16 product of 8320
    rows estimated 174 ms for a ~10 ms run. So an estimate that would rule the candidate out is
    checked with the `wider` scout, where there is one: what the work adds from one slice to two is
    what each further slice costs, and the estimate is the scout plus that for the rest of the work."""
    seconds = _scout_seconds(candidate.scout, keys_timed, lambda s: _rules_out(candidate.scale * s, shortest))
    estimate = candidate.scale * seconds
    if candidate.wider is None or not _rules_out(estimate, shortest):
        return estimate
    wider = _scout_seconds(candidate.wider, keys_timed, lambda s: True)
    per_slice = max(wider - seconds, 0.0)
    return min(estimate, seconds + per_slice * (candidate.scale - 1))


def _scout_seconds(
    scout: Callable[[], object], keys_timed: Callable[[], int], run_again: Callable[[float], bool]
) -> float:
    """A scout's seconds: its first run, and where that was short and cold and `run_again` says
    its seconds matter, the faster of it and a warm run."""
    seconds, warm = _own_seconds(scout, keys_timed)
    if not warm and seconds < TRUSTED_FIRST_RUN_S and run_again(seconds):
        seconds = min(seconds, _seconds(scout))
    return seconds


def _beaten(name: str, best: dict[str, float], timed_runs: dict[str, int], fastest: float) -> bool:
    """Whether a candidate's best time so far rules it out against the fastest."""
    seconds = best[name]
    return seconds > HOPELESS * fastest or (timed_runs[name] >= 2 and seconds > CLEARLY_SLOWER * fastest)


def _timed_runs_needed(seconds: float) -> int:
    return LONG_TIMED_RUNS if seconds >= TRUSTED_FIRST_RUN_S else TIMED_RUNS


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    hardware.synchronize()
    return time.perf_counter() - start


def _own_seconds(run: Callable[[], object], keys_timed: Callable[[], int]) -> tuple[float, int]:
    """Seconds of a first run and whether they are a timed run's (0 or 1): a first run that timed
    other keys inside is run again (their timing is not its cost, and it ran cold), and a second
    run is warm."""
    before = keys_timed()
    seconds = _seconds(run)
    return (_seconds(run), 1) if keys_timed() != before else (seconds, 0)


def _first_runs_are_measurements() -> bool:
    """Not where GPU work may be timed (CUDA initialised): a GPU's first call can load modules or
    plan kernels for longer than the run itself."""
    return not torch.cuda.is_initialized()


def _fastest(names: list[str], seconds: dict[str, float], handicaps: dict[str, float]) -> str:
    """The first of `names` within `NOISE` of the fastest, each one's seconds raised by its handicap."""
    weighed = {name: seconds[name] * (1 + handicaps.get(name, 0.0)) for name in names}
    fastest = min(weighed.values())
    return next(name for name in names if weighed[name] <= fastest * (1 + NOISE))


@dataclass(frozen=True)
class Measurement:
    """One timing: which candidate won for a key, and every candidate's seconds per run."""

    kind: str
    key: str
    choice: str
    seconds: dict[str, float]


class Autotuner:
    """Times candidates once per (kind, key) and remembers the fastest.

    Args:
        cache_file: JSON file of earlier choices on this machine (read now, updated on new choices);
            None keeps choices in memory only.
        timer: measures the candidates (`time_candidates`; tests pass a fake).

    New measurements wait in `measured` until `take_measured` hands them to a report.
    """

    def __init__(self, cache_file: Path | None = None, timer: Timer = time_candidates) -> None:
        self.cache_file = cache_file
        self.timer = timer
        self.choices: dict[str, str] = {}
        self.seconds: dict[str, dict[str, float]] = {}  # per entry, every candidate's seconds per run
        self.measured: list[Measurement] = []
        self.measurements = 0  # keys timed by this tuner (not found in memory or the cache)
        if cache_file is not None:
            for entry, found in _read_cache(cache_file).items():
                self.choices[entry], self.seconds[entry] = found["choice"], found.get("seconds", {})

    def choose(
        self,
        kind: str,
        key: str,
        candidates: Callable[[], Candidates],
        handicaps: dict[str, float] | None = None,
    ) -> str:
        """The fastest candidate's name for `key` (the first listed among those within `NOISE` of the
        fastest); `candidates` builds them, plainest first, only when timing is needed.

        `handicaps` adds a share of its seconds to a candidate's before they are compared: what the
        caller gives up in time to avoid it (e.g. 0.25: chosen only when a quarter faster)."""

        def measure() -> tuple[str, dict[str, float]]:
            built = candidates()
            if len(built) > 1:
                seconds = self.timer(built, lambda: self.measurements, handicaps or {})
            else:
                seconds = dict.fromkeys(built, 0.0)
            return _fastest(list(built), seconds, handicaps or {}), seconds

        return self.settle(kind, key, measure)

    def settle(self, kind: str, key: str, decide: Callable[[], tuple[str, dict[str, float]]]) -> str:
        """The choice for `key`: the one remembered (in memory, or in the cache file), or else
        `decide`'s, which returns it with what each option costs, and which is remembered from then on.
        A decision the caller reaches by its own measurement (not by timing candidates) is thus made
        once per machine as well, and a second run computes as the first did."""
        found = self.remembered(kind, key)
        if found is not None:
            return found
        entry = f"{kind}:{key}"
        choice, seconds = decide()
        self.choices[entry], self.seconds[entry] = choice, seconds
        self.measurements += 1
        self.measured.append(Measurement(kind, key, choice, seconds))
        if self.cache_file is not None:
            _write_cache(self.cache_file, {entry: {"choice": choice, "seconds": seconds}})
        return choice

    def remembered(self, kind: str, key: str) -> str | None:
        """The choice for `key` made before (in this run, a run resumed, or the cache file), if any."""
        return self.choices.get(f"{kind}:{key}")

    def seconds_of(self, kind: str, key: str) -> dict[str, float]:
        """What each candidate cost per run when `key` was measured (empty when it was restored)."""
        return self.seconds.get(f"{kind}:{key}", {})

    def take_measured(self) -> list[Measurement]:
        """The measurements made since the last call."""
        taken, self.measured = self.measured, []
        return taken

    def state_dict(self) -> dict[str, str]:
        return dict(self.choices)

    def load_state_dict(self, choices: dict[str, str]) -> None:
        """Restore choices (a resumed run's): they win over the cache file's."""
        self.choices.update(choices)


# ------------------------------------------------------------------------------------------------
# The cache file: one section per machine fingerprint.


# Bumped when the rules that turn timings into a choice change (handicaps, noise, candidates, scouts),
# so that a cache file's choices made under older rules are measured again, whatever openmae's version.
CHOICE_RULES = 4


def machine_fingerprint() -> str:
    """What decides which implementation is fastest: the CPU and its flags, the threads, the GPU,
    the versions of torch and openmae, and the rules of the choice (`CHOICE_RULES`)."""
    parts = [
        hardware.cpu_name(),
        ",".join(hardware.cpu_flags()),
        f"threads={torch.get_num_threads()}",
        torch.cuda.get_device_name() if hardware.cuda_available() else "no-cuda",
        f"torch={torch.__version__}",
        f"openmae={_version('openmae')}",
        f"rules={CHOICE_RULES}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def default_cache_file() -> Path:
    """`$OPENMAE_CACHE_DIR/autotune.json`, by default under `~/.cache/openmae`."""
    folder = Path(os.environ.get("OPENMAE_CACHE_DIR", Path.home() / ".cache" / "openmae"))
    return folder / "autotune.json"


def _read_cache(path: Path) -> dict[str, dict]:
    """This machine's entries `{entry: {"choice": name, "seconds": {name: s}}}`; well-formed ones only."""
    try:
        section = json.loads(path.read_text()).get(machine_fingerprint(), {})
        return {k: v for k, v in section.items() if isinstance(v, dict) and isinstance(v.get("choice"), str)}
    except (OSError, ValueError, AttributeError):  # missing, unreadable or damaged: start afresh
        return {}


def _write_cache(path: Path, new: dict[str, dict]) -> None:
    """Merge `new` into this machine's section; a cache that cannot be written is skipped."""
    try:
        everything = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(everything, dict):
            everything = {}
    except (OSError, ValueError):
        everything = {}
    everything.setdefault(machine_fingerprint(), {}).update(new)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(everything, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
