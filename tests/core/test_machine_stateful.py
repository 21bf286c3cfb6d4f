"""The machine under arbitrary interleavings of the two lanes (what threads can do).

Invariants: a sequence's committed tokens only grow; every speculation the target
verifies carries, for each draft token, the draft's own distribution at exactly that
token's context (so the cache never serves another sequence's or another context's
speculation); the metrics add up.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from backends.reference import ReferenceModel
from ssd_core import Lane, Machine, SamplingParams, SeededSource, SSDConfig
from ssd_core._events import perform


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
        prompts = [[(seed + i) % 6] * (i + 1) for i in range(batch)]
        self.m = Machine(
            prompts=prompts,
            params=[SamplingParams(temperature=temperature)] * batch,
            mode="ssd",
            config=SSDConfig(k=k, fanout=fanout, fallback=fallback),
            max_new_tokens=12,
            vocab_size=6,
            source=SeededSource(seed),
        )
        self.models = {Lane.TARGET: self.target, Lane.DRAFT: self.draft}
        self.held = {Lane.TARGET: None, Lane.DRAFT: None}
        self.last = [list(s.tokens) for s in self.m.seqs]

    @rule(lane=st.sampled_from([Lane.TARGET, Lane.DRAFT]))
    def issue(self, lane):
        if not self.m.done and self.held[lane] is None:
            req = self.m.next_request(lane)
            if req is not None:
                self.check_verified_speculations()
                self.held[lane] = (req, perform(self.models[lane], req))

    @rule(lane=st.sampled_from([Lane.TARGET, Lane.DRAFT]))
    def deliver(self, lane):
        if self.held[lane] is not None:
            req, res = self.held[lane]
            self.held[lane] = None
            self.m.deliver(req, res, 0.0)

    def check_verified_speculations(self):
        job = self.m._verify
        if job is None:
            return
        for s in job.seqs:
            spec = s.spec
            if spec.source == "fast":
                assert spec.q is None  # point masses: the verifier builds one-hot rows
                continue
            for i, tok in enumerate(spec.tokens):
                ctx = s.tokens + list(spec.tokens[:i])
                z = self.draft.logits(ctx)
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
        for old, s in zip(self.last, self.m.seqs):
            assert s.tokens[: len(old)] == old
        self.last = [list(s.tokens) for s in self.m.seqs]

    @invariant()
    def metrics_add_up(self):
        if not hasattr(self, "m"):
            return
        m = self.m.metrics
        assert m.generated_tokens == sum(len(o) for o in self.m.outputs)
        assert m.accepted_tokens <= m.proposed_tokens
        assert m.cache_hits <= m.cache_lookups
        assert m.hits_after_primary + m.hits_after_backup == m.cache_hits
        assert sum(m.fallbacks.values()) == m.cache_lookups - m.cache_hits
        if self.m.done:
            assert self.target.open_handles == 0 and self.draft.open_handles == 0


TestInterleavings = Interleavings.TestCase
TestInterleavings.settings = settings(max_examples=60, stateful_step_count=120, deadline=None)
