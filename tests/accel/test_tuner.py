"""The autotuner picks what its timer says is fastest, once per key, and remembers it."""

from __future__ import annotations

import json
import time

import pytest

from openmae.accel import tuner as tuner_module
from openmae.accel.tuner import Autotuner, Scouted, time_candidates


class FakeTimer:
    """Reports the given seconds per candidate and counts how often it was asked."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.calls = 0

    def __call__(self, candidates, keys_timed=None, handicaps=None):
        self.calls += 1
        return {name: self.seconds[name] for name in candidates}


def runs(*names):
    return lambda: {name: (lambda: None) for name in names}


@pytest.mark.parametrize("fastest", ["a", "b", "c"])
def test_picks_whichever_candidate_is_fastest(fastest):
    timer = FakeTimer({name: 1.0 if name == fastest else 2.0 for name in "abc"})
    assert Autotuner(timer=timer).choose("kind", "key", runs("a", "b", "c")) == fastest


def test_a_key_is_timed_once_then_served_from_memory():
    timer = FakeTimer({"a": 2.0, "b": 1.0})
    tuner = Autotuner(timer=timer)
    built = []

    def candidates():
        built.append(1)
        return {"a": lambda: None, "b": lambda: None}

    assert tuner.choose("kind", "key", candidates) == "b"
    assert tuner.choose("kind", "key", candidates) == "b"
    assert timer.calls == 1 and len(built) == 1  # nothing built or timed on the second call
    assert tuner.choose("kind", "other key", candidates) == "b" and timer.calls == 2
    measured = tuner.take_measured()
    assert [m.key for m in measured] == ["key", "other key"] and measured[0].seconds == {"a": 2.0, "b": 1.0}
    assert tuner.take_measured() == []


def test_a_single_candidate_is_not_timed():
    timer = FakeTimer({})
    assert Autotuner(timer=timer).choose("kind", "key", runs("only")) == "only" and timer.calls == 0


def test_choices_persist_in_the_cache_file_per_machine(tmp_path, monkeypatch):
    cache = tmp_path / "autotune.json"
    Autotuner(cache, timer=FakeTimer({"a": 1.0, "b": 2.0})).choose("kind", "key", runs("a", "b"))
    second = FakeTimer({"a": 2.0, "b": 1.0})
    assert Autotuner(cache, timer=second).choose("kind", "key", runs("a", "b")) == "a"  # from the file
    assert second.calls == 0
    monkeypatch.setattr(tuner_module, "machine_fingerprint", lambda: "another machine")
    assert Autotuner(cache, timer=second).choose("kind", "key", runs("a", "b")) == "b"  # measured anew
    assert len(json.loads(cache.read_text())) == 2  # one section per machine


def test_a_damaged_cache_file_is_ignored(tmp_path):
    cache = tmp_path / "autotune.json"
    cache.write_text("{not json")
    assert Autotuner(cache, timer=FakeTimer({"a": 1.0, "b": 2.0})).choose("k", "key", runs("a", "b")) == "a"
    assert json.loads(cache.read_text())  # rewritten whole


def test_restored_choices_win_over_measurement():
    tuner = Autotuner(timer=FakeTimer({"a": 1.0, "b": 2.0}))
    tuner.load_state_dict({"kind:key": "b"})
    assert tuner.choose("kind", "key", runs("a", "b")) == "b"
    assert tuner.state_dict() == {"kind:key": "b"}


def test_the_real_timer_ranks_a_slow_candidate_last():
    seconds = time_candidates({"fast": lambda: None, "slow": lambda: sum(range(20000))}, budget_s=0.01)
    assert seconds["fast"] < seconds["slow"]


def test_a_hopeless_candidate_runs_once_untimed_and_once_timed(monkeypatch):
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: False)  # as on a GPU
    calls = {"fast": 0, "slow": 0}

    def run(name: str, work: int):
        def once():
            calls[name] += 1
            sum(range(work))

        return once

    seconds = time_candidates({"fast": run("fast", 10), "slow": run("slow", 200_000)}, budget_s=0.05)
    assert seconds["fast"] < seconds["slow"] / tuner_module.HOPELESS
    assert calls["slow"] == 2 and calls["fast"] == 2  # left alone, the fast one is not run again


@pytest.mark.parametrize(("trusted", "slow_runs"), [(True, 1), (False, 2)])
def test_a_long_hopeless_first_run_is_a_measurement_on_a_cpu(monkeypatch, trusted, slow_runs):
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: trusted)
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(2 * tuner_module.TRUSTED_FIRST_RUN_S)

    seconds = time_candidates({"fast": fast, "slow": slow}, budget_s=0.01)
    assert calls["slow"] == slow_runs and calls["fast"] == 2
    assert seconds["slow"] >= 2 * tuner_module.TRUSTED_FIRST_RUN_S > seconds["fast"]


def test_within_the_noise_the_plainer_candidate_wins():
    # "plain" is listed first: a rival 2% faster is noise, one 10% faster is not.
    assert (
        Autotuner(timer=FakeTimer({"plain": 1.0, "fast": 0.98})).choose("k", "a", runs("plain", "fast"))
        == "plain"
    )
    assert (
        Autotuner(timer=FakeTimer({"plain": 1.0, "fast": 0.90})).choose("k", "b", runs("plain", "fast"))
        == "fast"
    )


def counted(calls: dict[str, int], name: str, seconds: float = 0.0):
    def once():
        calls[name] = calls.get(name, 0) + 1
        time.sleep(seconds)

    return once


@pytest.mark.parametrize("trusted", [True, False])
def test_a_scout_far_beyond_hopeless_spares_the_full_run_on_a_cpu(monkeypatch, trusted):
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: trusted)
    calls: dict[str, int] = {}
    # The scout does a tenth of the work: it estimates 10 x 0.03 s, far beyond hopeless against ~0 s.
    slow = Scouted(counted(calls, "slow", 0.03), counted(calls, "scout", 0.03), scale=10)
    seconds = time_candidates({"fast": counted(calls, "fast"), "slow": slow}, budget_s=0.01)
    if trusted:
        assert calls.get("slow", 0) == 0 and calls["scout"] == 2  # a short cold scout runs again
        assert seconds["slow"] >= 10 * 0.03  # the estimate stands for it
    else:  # as on a GPU: no scouting, the candidate runs (once untimed, once timed)
        assert calls["slow"] == 2 and "scout" not in calls
    assert calls["fast"] == 2


def test_a_scout_that_cannot_rule_its_candidate_out_leads_to_a_full_run(monkeypatch):
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: True)
    calls: dict[str, int] = {}
    # Estimated at 10 x ~0 s: below what a first run must take to count as a measurement.
    rival = Scouted(counted(calls, "rival"), counted(calls, "scout"), scale=10)
    seconds = time_candidates({"plain": counted(calls, "plain"), "rival": rival}, budget_s=0.01)
    # (Two no-ops race: either may leave the rounds as "hopeless" on timer jitter after one timed run.)
    assert calls["scout"] == 1 and calls["rival"] >= 2 and calls["plain"] >= 2
    assert seconds["rival"] < tuner_module.TRUSTED_FIRST_RUN_S


def test_a_first_run_that_timed_a_nested_choice_is_run_again(monkeypatch):
    # An attention kernel's first run can meet new product shapes, which the same tuner times inside
    # it; that time is not the kernel's and must not rule it out.
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: True)
    tuner = Autotuner()
    inner = {"x": lambda: time.sleep(0.02), "y": lambda: time.sleep(0.02)}
    calls: dict[str, int] = {}

    def nesting():
        calls["nesting"] = calls.get("nesting", 0) + 1
        tuner.choose("inner", "shape", lambda: inner)  # ~8 runs of 20 ms the first time only

    outer = {"plain": lambda: time.sleep(0.02), "nesting": nesting}
    assert tuner.choose("outer", "shape", lambda: outer) == "nesting"
    # Run again, then one round, which leaves it alone ("plain" is hopeless).
    assert tuner.measurements == 2 and calls["nesting"] == 3


def paced(calls: dict[str, int], name: str, seconds: list[float]):
    """A candidate whose runs report the given seconds, one after another (the last one repeats)."""

    def once():
        calls[name] = calls.get(name, 0) + 1
        return seconds[min(calls[name], len(seconds)) - 1]

    return once


@pytest.mark.parametrize(("rival_s", "runs"), [(0.015, 3), (0.011, 4)])
def test_a_clearly_slower_candidate_leaves_after_two_timed_runs(monkeypatch, rival_s, runs):
    # The timer reports what each run says it took: 10 ms for "plain", `rival_s` for "rival".
    monkeypatch.setattr(tuner_module, "_seconds", lambda run: run())
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: False)
    calls: dict[str, int] = {}
    candidates = {"plain": paced(calls, "plain", [0.01]), "rival": paced(calls, "rival", [rival_s])}
    time_candidates(candidates, budget_s=0.0)
    # 1.5x slower: out after its 2nd timed run (1 untimed + 2), which leaves "plain" alone: the end.
    # 1.1x: within reach, both get a 3rd timed run.
    assert calls == {"plain": runs, "rival": runs}


@pytest.mark.parametrize(("handicap", "plain_runs"), [(0.0, 3), (0.25, 4)])
def test_the_rounds_weigh_a_handicapped_candidate_as_the_choice_does(monkeypatch, handicap, plain_runs):
    monkeypatch.setattr(tuner_module, "_seconds", lambda run: run())
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: False)
    calls: dict[str, int] = {}
    # "plain" is disturbed in its first two timed runs (1.3x), then runs at its speed, 10 ms.
    candidates = {
        "plain": paced(calls, "plain", [0.01, 0.013, 0.013, 0.01]),
        "keeper": paced(calls, "keeper", [0.01]),
    }
    seconds = time_candidates(candidates, handicaps={"keeper": handicap}, budget_s=0.0)
    # Unweighed, "plain" leaves after two runs 1.3x slower, and its best stays 13 ms; weighed
    # (keeper 12.5 ms), it races on, and its third timed run shows its speed.
    assert calls["plain"] == plain_runs
    assert seconds["plain"] == (0.01 if handicap else 0.013)


def test_a_candidate_is_not_ruled_out_by_one_slow_timed_run(monkeypatch):
    monkeypatch.setattr(tuner_module, "_seconds", lambda run: run())
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: False)
    calls: dict[str, int] = {}
    # The rival's first timed run is disturbed (1.5x), its next ones are the fastest.
    candidates = {
        "plain": paced(calls, "plain", [0.01]),
        "rival": paced(calls, "rival", [0.01, 0.015, 0.009]),
    }
    seconds = time_candidates(candidates, budget_s=0.0)
    assert calls["rival"] == 4 and seconds["rival"] == 0.009


@pytest.mark.parametrize(("trusted", "seconds", "runs"), [(True, 0.06, 2), (False, 0.06, 3), (True, 0.01, 4)])
def test_long_runs_get_two_timed_runs_short_ones_three(monkeypatch, trusted, seconds, runs):
    # On a CPU a first run of TRUSTED_FIRST_RUN_S (50 ms) or more is one of them.
    monkeypatch.setattr(tuner_module, "_seconds", lambda run: run())
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: trusted)
    calls: dict[str, int] = {}
    time_candidates({name: paced(calls, name, [seconds]) for name in ("a", "b")}, budget_s=0.0)
    assert calls == {"a": runs, "b": runs}


@pytest.mark.parametrize("trusted", [True, False])
def test_the_second_run_of_a_first_run_that_timed_a_nested_choice_is_a_timed_run(monkeypatch, trusted):
    monkeypatch.setattr(tuner_module, "_seconds", lambda run: run())
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: trusted)
    calls: dict[str, int] = {}
    keys_timed = [0]
    nesting = paced(calls, "nesting", [0.045])  # short runs: 3 timed runs

    def first_meets_a_new_key():
        if "nesting" not in calls:
            keys_timed[0] += 1
        return nesting()

    candidates = {"nesting": first_meets_a_new_key, "plain": paced(calls, "plain", [0.05])}
    time_candidates(candidates, lambda: keys_timed[0], budget_s=0.0)
    # "nesting": a first run, a second (timed) one, two rounds. "plain" (long runs: 2 timed runs): on
    # a CPU its first run is timed too; as on a GPU it is not.
    assert calls == {"nesting": 4, "plain": 3}


@pytest.mark.parametrize(
    ("scout_s", "scout_runs", "full_runs"),
    [
        ([0.04, 0.001], 2, 4),  # cold 0.4 s estimated, warm 10 ms: no longer ruled out, raced in full
        ([0.04, 0.04], 2, 0),  # warm as slow: ruled out
        ([0.06, 0.001], 1, 0),  # a cold run of 50 ms or more is trusted: ruled out, not run again
    ],
)
def test_a_short_cold_scout_that_would_rule_out_runs_again_warm(monkeypatch, scout_s, scout_runs, full_runs):
    monkeypatch.setattr(tuner_module, "_seconds", lambda run: run())
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: True)
    calls: dict[str, int] = {}
    rival = Scouted(paced(calls, "rival", [0.01]), paced(calls, "scout", scout_s), scale=10)
    time_candidates({"plain": paced(calls, "plain", [0.01]), "rival": rival}, budget_s=0.0)
    assert calls["scout"] == scout_runs and calls.get("rival", 0) == full_runs


@pytest.mark.parametrize(
    ("wider_s", "full_runs", "estimate"),
    [
        # Twice the slice takes hardly longer: the scout's 4 ms are fixed costs (0.1 ms a slice,
        # 4 + 19 x 0.1 = 5.9 ms for the whole): raced in full.
        (0.0041, 4, None),
        # Twice the slice takes twice as long: the work is slow, 80 ms in all: ruled out, unrun.
        (0.008, 0, 0.08),
    ],
)
def test_a_wider_scout_tells_fixed_costs_from_slow_work(monkeypatch, wider_s, full_runs, estimate):
    monkeypatch.setattr(tuner_module, "_seconds", lambda run: run())
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: True)
    calls: dict[str, int] = {}
    # The scout (a 20th of the work, 4 ms) alone estimates 80 ms: 8x the plain path's 10 ms.
    rival = Scouted(
        paced(calls, "rival", [0.01]),
        paced(calls, "scout", [0.004]),
        scale=20,
        wider=paced(calls, "wider", [wider_s]),
    )
    seconds = time_candidates({"plain": paced(calls, "plain", [0.01]), "rival": rival}, budget_s=0.0)
    assert calls["scout"] == 2 and calls["wider"] == 2  # cold, then warm
    assert calls.get("rival", 0) == full_runs
    if estimate is not None:
        assert seconds["rival"] == pytest.approx(estimate)


class FakeClock:
    """`time.perf_counter` for the tuner, moved on by the runs a fake `_seconds` reports."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def run(self, run) -> float:
        seconds = run()
        self.now += seconds
        return seconds


@pytest.mark.parametrize(("cold_s", "runs"), [(0.001, 21), (0.5, 4)])
def test_the_budget_counts_from_the_first_runs(monkeypatch, cold_s, runs):
    # Two 1 ms candidates, "cold"'s first run takes `cold_s`. Within the 0.3 s budget both race all 20
    # rounds; a first run that spent it leaves them the 3 timed runs they need, no more.
    clock = FakeClock()
    monkeypatch.setattr(tuner_module, "time", clock)
    monkeypatch.setattr(tuner_module, "_seconds", clock.run)
    monkeypatch.setattr(tuner_module, "_first_runs_are_measurements", lambda: False)  # cold is not hopeless
    calls: dict[str, int] = {}
    candidates = {"cold": paced(calls, "cold", [cold_s, 0.001]), "warm": paced(calls, "warm", [0.001])}
    time_candidates(candidates, budget_s=0.3)
    assert calls == {"cold": runs, "warm": runs}


@pytest.mark.parametrize(("rival_s", "choice"), [(0.7, "rival"), (0.9, "plain"), (1.1, "plain")])
def test_a_handicapped_candidate_is_chosen_only_when_faster_by_its_handicap(rival_s, choice):
    timer = FakeTimer({"plain": 1.0, "rival": rival_s})
    tuner = Autotuner(timer=timer)
    assert tuner.choose("kind", "key", runs("plain", "rival"), handicaps={"rival": 0.25}) == choice
    assert tuner.seconds_of("kind", "key") == {"plain": 1.0, "rival": rival_s}  # as measured
    # Without a handicap 10% faster is past the noise.
    assert Autotuner(timer=timer).choose("kind", "key", runs("plain", "rival")) == min(
        timer.seconds, key=timer.seconds.get
    )


def test_choices_made_under_other_rules_are_measured_again(tmp_path, monkeypatch):
    cache = tmp_path / "autotune.json"
    Autotuner(cache, timer=FakeTimer({"a": 1.0, "b": 2.0})).choose("kind", "key", runs("a", "b"))
    monkeypatch.setattr(tuner_module, "CHOICE_RULES", tuner_module.CHOICE_RULES + 1)
    timer = FakeTimer({"a": 2.0, "b": 1.0})
    assert Autotuner(cache, timer=timer).choose("kind", "key", runs("a", "b")) == "b" and timer.calls == 1
