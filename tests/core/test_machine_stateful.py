"""The machine under arbitrary interleavings of the two lanes (what threads can do),
with sequences joining and being cancelled at any time (continuous batching).

Invariants: a sequence's committed tokens only grow; every speculation the target
verifies carries, for each draft token, the draft's own distribution at exactly that
token's context (so the cache never serves another sequence's or another context's
speculation); the metrics add up; once the machine is idle, no handle is left open.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from backends.reference import ReferenceModel
from ssd_core import Lane, Machine, RandomStream, SamplingParams, SeededSource, SSDConfig, Stage
from ssd_core.testing import Extend, Purpose, perform


class Interleavings(RuleBasedStateMachine):
    @initialize(
        seed=st.integers(0, 1000),
        k=st.integers(1, 3),
        fanout=st.integers(0, 6),
        fallback=st.sampled_from(["neural", "fast"]),
        temperature=st.sampled_from([0.0, 1.0]),
        batch=st.integers(1, 3),
    )
    def setup(self, seed, k, fanout, fallback, temperature, batch):
        self.target = ReferenceModel.random(vocab_size=6, order=2, seed=seed, peakedness=2.0)
        self.draft = ReferenceModel.perturbed(self.target, divergence=0.7, seed=seed + 1)
        self.temperature = temperature
        self.seed = seed
        self.m = Machine(
            mode="ssd",
            config=SSDConfig(k=k, fanout=fanout, fallback=fallback),
            vocab_size=6,
            source=SeededSource(seed, check_unique=True),
        )
        self.added = 0
        self.checked = 0
        for _ in range(batch):
            self.add_one()
        self.models = {Lane.TARGET: self.target, Lane.DRAFT: self.draft}
        self.held = {Lane.TARGET: None, Lane.DRAFT: None}
        self.last = {v.sid: v.tokens for v in self.m.sequences()}

    def add_one(self):
        i = self.added
        self.added += 1
        self.m.add(
            [(self.seed + i) % 6] * (i % 3 + 1),
            SamplingParams(temperature=self.temperature),
            max_new_tokens=12,
            stream=RandomStream(None, i),
        )

    @precondition(lambda self: self.added < 6)
    @rule()
    def join(self):
        self.add_one()

    @rule(which=st.integers(0, 5), roll=st.integers(0, 9))
    def cancel(self, which, roll):
        # One draw in ten: a cancel as likely as a delivery would end most runs early.
        live = [v.sid for v in self.m.sequences() if v.stage not in (Stage.FINISHED, Stage.CLOSED)]
        if live and roll == 0:
            self.m.finish(live[which % len(live)], "cancelled")

    @rule(first=st.sampled_from([Lane.TARGET, Lane.DRAFT]), steps=st.integers(1, 12))
    def run_a_while(self, first, steps):
        """Drive both lanes for a few requests, so runs get somewhere."""
        for _ in range(steps):
            for lane in (first, Lane.DRAFT if first is Lane.TARGET else Lane.TARGET):
                self.issue(lane)
                self.deliver(lane)

    @rule(lane=st.sampled_from([Lane.TARGET, Lane.DRAFT]))
    def issue(self, lane):
        if self.held[lane] is None:
            req = self.m.next_request(lane)
            if req is not None:
                if isinstance(req, Extend) and req.purpose is Purpose.VERIFY:
                    self.check_verified_speculations()
                self.held[lane] = (req, perform(self.models[lane], req))

    @rule(lane=st.sampled_from([Lane.TARGET, Lane.DRAFT]))
    def deliver(self, lane):
        if self.held[lane] is not None:
            req, res = self.held[lane]
            self.held[lane] = None
            self.m.deliver(req, res, 0.0)

    def check_verified_speculations(self):
        for v in self.m.sequences():
            if v.stage is not Stage.VERIFYING or v.speculation is None:
                continue
            spec = v.speculation
            if spec.source == "fast":
                assert spec.q is None  # point masses: the verifier builds one-hot rows
                continue
            self.checked += 1
            for i, tok in enumerate(spec.tokens):
                ctx = list(v.tokens) + list(spec.tokens[:i])
                z = self.draft.logits(ctx)
                if spec.q is None:  # a greedy draft proposes point masses at its argmax
                    assert self.temperature == 0.0 and tok == int(np.argmax(z))
                    continue
                q = np.asarray(spec.q[i], dtype=np.float64)
                q = q / q.sum()
                if self.temperature == 0.0:
                    assert tok == int(np.argmax(z)) and q[tok] == 1.0
                else:
                    expected = np.exp(z - z.max())
                    np.testing.assert_allclose(q, expected / expected.sum(), atol=1e-12)

    @invariant()
    def committed_prefix_only_grows(self):
        if not hasattr(self, "m"):
            return
        for v in self.m.sequences():
            old = self.last.get(v.sid, v.tokens[: v.prompt_len])
            assert v.tokens[: len(old)] == old
            self.last[v.sid] = v.tokens

    @invariant()
    def metrics_add_up(self):
        if not hasattr(self, "m"):
            return
        c = self.m.counters
        assert c.generated_tokens == sum(len(v.generated) for v in self.m.sequences())
        assert c.accepted_tokens <= c.proposed_tokens
        assert c.cache_hits <= c.cache_lookups
        assert c.hits_after_primary + c.hits_after_backup == c.cache_hits
        assert sum(c.fallbacks.values()) == c.cache_lookups - c.cache_hits
        if self.m.idle and all(h is None for h in self.held.values()):
            assert self.target.open_handles == 0 and self.draft.open_handles == 0


TestInterleavings = Interleavings.TestCase
TestInterleavings.settings = settings(max_examples=60, stateful_step_count=120, deadline=None)
