"""Every in-house backend that exists passes the suite; engines not installed skip."""

from __future__ import annotations

import numpy as np
import pytest

import conformance
from backends.reference import ReferenceModel
from ssd_core.app import available_backends, load_backend

from .broken import Wrapper, reference


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(vocab_size=64, order=2, seed=1),
        dict(vocab_size=16, order=3, seed=2, context_size=12),
        dict(vocab_size=40, order=1, seed=5, zero_fraction=0.3),  # -inf logits are allowed
        dict(vocab_size=8, order=1, seed=0, context_size=5),  # tiny context: checks shrink
    ],
    ids=["order2", "order3-context12", "zero-mass", "context5"],
)
def test_reference_backend_passes(kwargs: dict) -> None:
    truth = ReferenceModel.random(**kwargs)  # its own logits are the reference scorer
    report = conformance.assert_conforms(
        lambda: ReferenceModel.random(**kwargs), reference=truth.logits
    )
    assert report.passed
    skipped = {r.name for r in report.rows if r.status is conformance.Status.SKIPPED}
    assert skipped == (set() if "context_size" in kwargs else {"context_capacity"})


def test_without_a_reference_the_oracle_row_says_what_it_misses() -> None:
    report = conformance.check_model(reference, only=["reference_logits"])
    row = report.rows[0]
    assert row.status is conformance.Status.SKIPPED
    assert "compares the model only with itself" in row.message
    assert "temperature baked in" in row.message


def test_reference_whole_context_model_passes() -> None:
    def fn(ctx: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng(abs(hash(ctx)) % (1 << 32))
        return rng.standard_normal(12)

    report = conformance.check_model(
        lambda: ReferenceModel.from_callable(fn, vocab_size=12, order=None), quick=True
    )
    report.raise_for_failures()


def test_full_run_passes_on_reference() -> None:
    report = conformance.check_model(lambda: reference(context_size=20), quick=False)
    report.raise_for_failures()
    walk = next(r for r in report.rows if r.name == "stateful_walk")
    assert walk.measured.startswith("1500 ops")


#: In-house backends whose default model is itself tiny (pure numpy).
TINY_DEFAULTS = {"reference", "ngram"}


def _run_backend(name: str) -> None:
    # one engine thread: on a shared CPU spinning thread pools make torch ~30x slower
    report = conformance.check_backend(name, options={"threads": 1})
    report.raise_for_failures()
    if not report.passed:
        assert report.status is conformance.Status.SKIPPED
        assert report.rows[0].message, "a skip must say why"
        pytest.skip(f"{name}: {report.rows[0].message}")


@pytest.mark.parametrize("name", sorted(available_backends()))
def test_every_registered_backend_passes_on_its_conformance_model(name: str) -> None:
    """Fast tier: each backend on its tiny ``conformance_target`` (or tiny default)."""
    try:
        spec = load_backend(name)
    except ImportError as exc:
        pytest.skip(f"{name}: engine not installed: {exc}")
    if getattr(spec, "conformance_target", None) is None and name not in TINY_DEFAULTS:
        pytest.skip(f"{name}: no conformance_target; its default model runs in the slow tier")
    _run_backend(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(available_backends()))
def test_every_registered_backend_passes_on_its_default_model(name: str) -> None:
    """Slow tier: each backend on its default (possibly real) model, ``--quick``."""
    try:
        spec = load_backend(name)
    except ImportError as exc:
        pytest.skip(f"{name}: engine not installed: {exc}")
    if getattr(spec, "conformance_target", None) is None and name in TINY_DEFAULTS:
        pytest.skip(f"{name}: already checked in the fast tier")
    report = conformance.check_backend(
        name, args=(spec.default_target or spec.default_draft or "").partition(":")[2] or None
    )
    report.raise_for_failures()
    if not report.passed:
        pytest.skip(f"{name}: {report.rows[0].message}")


class Float32(Wrapper):
    """The reference, rounded to float32 (what most engines return)."""

    def extend(self, requests):  # type: ignore[no-untyped-def]
        return np.asarray(self.inner.extend(requests), dtype=np.float32)


class Torch(Wrapper):
    """The reference, returned as torch tensors of a chosen dtype."""

    dtype = "float32"

    def extend(self, requests):  # type: ignore[no-untyped-def]
        import torch

        out = torch.from_numpy(self.inner.extend(requests))
        return out.to(getattr(torch, self.dtype))


def test_float32_logits_get_float32_tolerance() -> None:
    report = conformance.assert_conforms(Float32)
    assert "tolerance 0.0001" in report.settings


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_torch_tensors_are_converted(dtype: str) -> None:
    pytest.importorskip("torch")
    cls = type(f"Torch_{dtype}", (Torch,), {"dtype": dtype})
    report = conformance.assert_conforms(cls)
    assert f"torch.{dtype}" in next(r.measured for r in report.rows if r.name == "shapes_dtypes")


def test_torch_integer_logits_fail() -> None:
    pytest.importorskip("torch")
    cls = type("TorchInt", (Torch,), {"dtype": "int64"})
    report = conformance.check_model(cls, only=["shapes_dtypes"])
    assert report.failed
    assert "real floating dtype" in report.rows[0].message


def test_models_offering_free_are_freed_once_each() -> None:
    made: list[Wrapper] = []
    freed: list[Wrapper] = []

    class Freeable(Wrapper):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

        def free(self) -> None:
            freed.append(self)

    conformance.assert_conforms(Freeable)
    assert len(made) > 10
    assert sorted(map(id, freed)) == sorted(map(id, made))


def test_a_free_that_raises_fails_the_check() -> None:
    class BadFree(Wrapper):
        def free(self) -> None:
            raise RuntimeError("double free")

    report = conformance.check_model(BadFree, only=["attributes"])
    assert report.failed
    assert "free() raised RuntimeError: double free" in report.rows[0].message


def test_documented_tolerance_applies_when_the_cli_leaves_it_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import attrs

    import ssd_core.app.registry as registry

    from .ghost_engine import DRAFT_ONLY

    loose = attrs.evolve(DRAFT_ONLY, conformance_tolerance=0.25)
    monkeypatch.setattr("tests.conformance.ghost_engine.LOOSE", loose, raising=False)
    monkeypatch.setitem(registry.IN_HOUSE, "ghost", "tests.conformance.ghost_engine:LOOSE")
    report = conformance.check_backend(
        "ghost", tolerance=None, batch_tolerance=None, only=["attributes"]
    )
    assert "tolerance 0.25, batch tolerance 0.25" in report.settings
    mine = conformance.check_backend("ghost", tolerance=0.5, only=["attributes"])
    assert "tolerance 0.5, batch tolerance 0.25" in mine.settings
