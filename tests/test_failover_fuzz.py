"""Seeded random failover scenarios: the orchestrator against actors that fail as Ray actors
do, on a virtual clock.

Each seed draws 1-3 executors (1-4 slots, some dying at random), up to 6 streams (no more
than there are slots), maybe a stream whose every step kills its actor and one whose
every decode does, ``max_failures`` and ``snapshot_every``. An actor runs its steps one at
a time and its decodes one at a time beside them; a call ends 1-3 ticks after it starts (a
tick per wait of the orchestrator's loop); a lethal call kills the actor when it ends, and
every call of that life not done by then fails with it; the actor comes back empty. Each
scenario checks DESIGN.md's failover promises: every good stream's video is whole and as
made alone, every poison stream is given up on (``NoProgress`` names it) within its bound
of actor deaths (2 x max_failures, not counting those of an actor retired as broken, which
forgives the failures on it), and no good stream is given up on unless a random death took
part.

Run over thousands of seeds, this harness (in its first form, outside the suite) found
bugs that tests in test_orchestrator.py now pin down (decodes blamed for a poison step, a
slot left taken by a restarted actor, a poison decode that killed up to 20 actors)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.test_orchestrator import assert_as_alone, reference, request_for, run_giving_up
from workers.actor import GeneratorWorker
from workers.executors import ExecutorFailed, LocalExecutor, _Done
from workers.orchestrator import NoProgress, Orchestrator, QueueSink

STEP_POISON, DECODE_POISON = 666, 777
TICK_LIMIT = 6000  # a scenario still running by then is a livelock


class World:
    """The virtual clock of one scenario's actors; deaths happen in time order."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.now = rng, 0
        self.actors: list[VirtualActor] = []
        # (cause, keys of the lethal call, the actor that died)
        self.deaths: list[tuple[str, list[int], VirtualActor]] = []
        self.seeds: dict[int, int] = {}  # stream key -> request seed

    def advance_to(self, t: int) -> None:
        while True:
            due = [(a.pending[0], i) for i, a in enumerate(self.actors) if a.pending]
            due = [d for d in due if d[0] <= t]
            if not due:
                break
            when, i = min(due)
            self.actors[i].die(when)
        self.now = max(self.now, t)


class VirtualActor(LocalExecutor):
    """Steps one at a time, decodes one at a time beside them, each call done 1-3 ticks after
    it starts (a decode 0-2); a poison call (or, with probability ``p_die``, any call) kills
    the process when it ends."""

    def __init__(
        self, world: World, model: str, max_streams: int, p_die: float, broken: bool = False
    ) -> None:
        super().__init__(GeneratorWorker(model, max_streams=max_streams), f"v{len(world.actors)}")
        self.world, self.model, self.max_streams, self.p_die = world, model, max_streams, p_die
        self.broken = broken  # restarted under every step: each fails with StreamsLost
        self.life, self.busy = 0, {"step": 0, "decode": 0}
        self.pending: tuple[int, str, list[int]] | None = None  # death: (tick, cause, keys)
        self.outstanding: list[_Done] = []
        world.actors.append(self)

    def _submit(self, kind: str, done: _Done, ticks: int, cause: str | None, keys: list[int]):
        start = max(self.world.now, self.busy[kind])
        self.busy[kind] = done.at = start + ticks
        done.life, done.world = self.life, self.world
        if cause is not None:
            done.error, done.value = ExecutorFailed(f"{self.name} killed by {cause}"), None
            if self.pending is None or done.at < self.pending[0]:
                self.pending = (done.at, cause, list(keys))
        self.outstanding = [h for h in self.outstanding if h.at >= self.world.now] + [done]
        return done

    def die(self, when: int) -> None:
        _, cause, keys = self.pending
        self.pending = None
        for h in self.outstanding:
            if h.life == self.life and h.at >= when:
                if h.error is None:
                    h.error = ExecutorFailed(f"{self.name} died ({cause}) while this call ran")
                h.value, h.at = None, when
        self.life += 1
        self.busy = {"step": when, "decode": when}
        self.worker = GeneratorWorker(self.model, max_streams=self.max_streams)
        self.world.deaths.append((cause, keys, self))

    def _lethal(self, keys: list[int], poison: int, kind: str) -> str | None:
        if any(self.world.seeds.get(k) == poison for k in keys):
            return f"{kind}-poison"
        return f"random-{kind}" if self.p_die and self.world.rng.random() < self.p_die else None

    def step(self, keys, epochs, snapshot_keys):
        held = [k for k in keys if k in self.worker.streams]
        cause = self._lethal(held, STEP_POISON, "step")
        if self.broken and not cause:
            for key in held:
                self.worker.close(key)
        done = _Done() if cause else self._call(self.worker.step, keys, epochs, snapshot_keys)
        return self._submit("step", done, self.world.rng.randint(1, 3), cause, keys)

    def decode(self, clips):
        keys = [c.key for c in clips]
        cause = self._lethal(keys, DECODE_POISON, "decode")
        done = _Done() if cause else self._call(self.worker.decode, clips)
        # A lethal call takes a tick at least: the calls queued before it end first.
        ticks = self.world.rng.randint(1 if cause else 0, 2)
        return self._submit("decode", done, ticks, cause, keys)

    def _behind_the_step(self) -> None:
        """An open or restore waits for the step in flight (blocking the caller), and dies
        with a death before it runs."""
        start = max(self.world.now, self.busy["step"])
        if self.pending is not None and self.pending[0] <= start:
            self.world.advance_to(self.pending[0])
            raise ExecutorFailed(f"{self.name} died while an open waited behind a call")
        self.world.advance_to(start)
        self.busy["step"] = start

    def open(self, key, request, timeout=None):
        self.world.seeds[key] = request.seed
        self._behind_the_step()
        super().open(key, request, timeout)

    def restore(self, key, snapshot, timeout=None):
        self.world.seeds[key] = snapshot.request.seed
        self._behind_the_step()
        super().restore(key, snapshot, timeout)

    @staticmethod
    def wait(handles, timeout, first=False):
        world = handles[0].world
        if timeout is None or timeout > 0:
            world.advance_to(world.now + 1)
            if world.now > TICK_LIMIT:
                raise AssertionError(f"no end after {TICK_LIMIT} ticks: a livelock")
        return [h for h in handles if h.at <= world.now]


def run_scenario(seed: int, models: dict[str, str], broken: bool = False) -> None:
    """``broken``: one more actor, first, whose every step fails (StreamsLost) while it lives."""
    rng = random.Random(seed)
    model = models[rng.choice(["diffusion", "tokens"])]
    specs = [
        (rng.randint(1, 4), rng.choice([0.02, 0.05, 0.1]) if rng.random() < 0.4 else 0.0)
        for _ in range(rng.randint(1, 3))
    ]
    if broken:
        specs.insert(0, (rng.randint(1, 4), 0.0))
    slots = sum(n for n, _ in specs)  # a stream more would be refused
    count = rng.randint(min(2, slots), min(6, slots))
    roles = ["good"] * count
    order = rng.sample(range(count), count)
    if rng.random() < 0.5:
        roles[order[0]] = "step_poison"
    if count > 1 and rng.random() < 0.5:
        roles[order[1]] = "decode_poison"
    max_failures, snapshot_every = rng.choice([3, 3, 4]), rng.randint(1, 3)
    seeds = rng.sample(range(1, 9), count)
    clips = [rng.randint(1, 4) for _ in range(count)]
    world = World(random.Random(seed * 7919 + 1))
    actors = [
        VirtualActor(world, model, slots, p, broken and i == 0)
        for i, (slots, p) in enumerate(specs)
    ]
    orch = Orchestrator(actors, snapshot_every=snapshot_every, max_failures=max_failures)
    poison = {"step_poison": STEP_POISON, "decode_poison": DECODE_POISON}
    reqs = [
        request_for(model, frames=orch.clip_len * n, seed=poison.get(role, s))
        for role, s, n in zip(roles, seeds, clips, strict=True)
    ]
    keys: list[int] = []
    named: set[int] = set()  # the streams NoProgress gave up on
    for req in reqs:
        while True:  # a NoProgress while placing it names another stream: not submitted
            try:
                keys.append(orch.submit(req, sink=QueueSink(64)))
                break
            except NoProgress as err:
                named.add(err.key)
                orch.cancel(err.key)
    run_giving_up(orch, tries=len(reqs) + 1, named=named)  # each NoProgress cancels one

    random_deaths = any(cause.startswith("random") for cause, _, _ in world.deaths)
    # An actor retired as broken (dropped: no replace here) takes the failures of streams on
    # it with it, a poison's deaths there too: they are not counted against its bound.
    retired = [a for a in actors if not any(a is e for e in orch.executors)]
    for key, role, req in zip(keys, roles, reqs, strict=True):
        if role != "good":
            assert key in named, f"seed {seed}: the {role} stream was never given up on"
            lethal = role.replace("_", "-")
            deaths = sum(
                cause == lethal and key in ks and not any(a is r for r in retired)
                for cause, ks, a in world.deaths
            )
            # A decode of a decode poison already sent when it is given up on still runs.
            bound = 2 * max_failures + (role == "decode_poison")
            assert deaths <= bound, f"seed {seed}: the {role} stream killed {deaths}"
            continue
        if key in named:
            assert random_deaths, f"seed {seed}: good stream {key} given up on"
            continue
        s = orch.streams[key]
        assert [c.clip for c in s.sink.queue] == list(range(len(s.sink.queue)))
        assert len(s.sink.queue) == req.frames // orch.clip_len and s.sink.finished
        got = np.concatenate([c.frames for c in s.sink.queue])
        assert_as_alone(got, reference(model, req))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from tests.models import save_test_generators

    return save_test_generators(tmp_path_factory.mktemp("models"))


# The first seeds; those of the first 300 on which a poison decode killed 9-14 actors before
# a clip of a stream whose decode failed counted as made only once decoded; and two of the
# next 800 on which one killed 8 (max_failures 3) while a death found by an open was blamed
# on the stream being opened, not on the decode running.
@pytest.mark.parametrize("seed", [*range(16), 113, 136, 169, 291, 639, 943])
def test_random_failures_lose_nothing_and_give_up_only_poison(models, seed):
    run_scenario(seed, models)


# The first seeds, and two of the first 200 on which a step poison killed 10 and 14 actors
# besides the broken one while the broken one's retirement cleared its failure count.
@pytest.mark.parametrize("seed", [*range(8), 12, 38])
def test_a_broken_actor_beside_random_failures_costs_no_good_stream(models, seed):
    """With an actor that restarts under every step beside the others: its streams move and
    finish elsewhere (none is given up on for its faults), poison streams are still given up
    on, within their bound."""
    run_scenario(seed, models, broken=True)


if __name__ == "__main__":  # a long sweep: python -m tests.test_failover_fuzz FIRST LAST [broken]
    import json
    import sys
    import tempfile
    from pathlib import Path

    import torch

    from tests.models import save_test_generators

    torch.set_num_threads(1)
    first, last = int(sys.argv[1]), int(sys.argv[2])
    saved = save_test_generators(Path(tempfile.mkdtemp()))
    failed = []
    for seed in range(first, last):
        try:
            run_scenario(seed, saved, broken=sys.argv[3:] == ["broken"])
        except AssertionError as err:
            failed.append([seed, str(err)[:200]])
    print(json.dumps({"seeds": last - first, "failed": len(failed), "first_failures": failed[:20]}))
