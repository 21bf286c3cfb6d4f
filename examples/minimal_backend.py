"""A complete minimal backend: a hashed bigram model over numpy, with its own handles.

Run the conformance suite on it with::

    python -m conformance examples.minimal_backend:make_model
    python -m conformance examples.minimal_backend:make_model \
        --reference examples.minimal_backend:reference_logits
    python -m conformance examples.minimal_backend:make_model \
        --draft examples.minimal_backend:make_draft

Everything a real backend does is here in miniature: a handle table (a real backend
keeps a KV cache or a sequence slot per handle), prefill in ``open``, one logits row
per appended token in ``extend``, copies in ``fork``, and the exact exceptions the
protocol asks for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ssd_core import CapacityError, HandleError, InputError


class BigramModel:
    """Logits depend on the last token only: row ``t`` of a fixed random table.

    Args:
        vocab_size: number of tokens.
        seed: the table is a pure function of the seed.
        context_size: most tokens one handle may hold (``None``: unbounded).
    """

    tokenizer = None  # id-only model

    def __init__(
        self, vocab_size: int = 50, *, seed: int = 0, context_size: int | None = 64
    ) -> None:
        self.name = f"bigram-{vocab_size}"
        self.vocab_size = vocab_size
        self.context_size = context_size
        rng = np.random.default_rng(seed)
        self._table = rng.standard_normal((vocab_size, vocab_size)).astype(np.float32)
        self._seqs: dict[int, list[int]] = {}  # handle -> tokens (a real backend: KV state)
        self._next_handle = 0

    # -- validation helpers ---------------------------------------------------------

    def _tokens(self, tokens: Sequence[int]) -> list[int]:
        out = [int(t) for t in tokens]
        bad = [t for t in out if not 0 <= t < self.vocab_size]
        if bad:
            raise InputError(f"{self.name}: token ids {bad} outside [0, {self.vocab_size})")
        return out

    def _seq(self, handle: object) -> list[int]:
        try:
            return self._seqs[handle]  # type: ignore[index]
        except (KeyError, TypeError):
            raise HandleError(f"{self.name}: unknown or closed handle {handle!r}") from None

    def _fits(self, n: int) -> None:
        if self.context_size is not None and n > self.context_size:
            raise CapacityError(f"{self.name}: {n} tokens exceed context size {self.context_size}")

    def _new_handle(self, tokens: list[int]) -> int:
        handle = self._next_handle
        self._next_handle += 1
        self._seqs[handle] = tokens
        return handle

    # -- the Model protocol ---------------------------------------------------------

    def open(self, tokens: Sequence[int]) -> int:
        """Make a handle holding ``tokens`` (prefill; no logits)."""
        toks = self._tokens(tokens)
        self._fits(len(toks))
        return self._new_handle(toks)

    def extend(self, requests: Sequence[tuple[object, Sequence[int]]]) -> np.ndarray:
        """Append tokens to each handle; one logits row per appended token."""
        checked = []
        seen = set()
        for handle, tokens in requests:  # validate everything before changing anything
            seq = self._seq(handle)
            if handle in seen:
                raise InputError(f"{self.name}: handle {handle!r} twice in one extend")
            seen.add(handle)
            toks = self._tokens(tokens)
            if not toks:
                raise InputError(f"{self.name}: empty extend for handle {handle!r}")
            self._fits(len(seq) + len(toks))
            checked.append((seq, toks))
        rows = []
        for seq, toks in checked:
            seq.extend(toks)
            rows.extend(self._table[t] for t in toks)  # logits after ...t depend on t
        return np.stack(rows)

    def fork(self, handle: object, length: int) -> int:
        """A new, independent handle holding the first ``length`` tokens."""
        seq = self._seq(handle)
        if not 0 <= length <= len(seq):
            raise HandleError(f"{self.name}: fork length {length} outside [0, {len(seq)}]")
        return self._new_handle(seq[:length])  # a copy, never the same list

    def truncate(self, handle: object, length: int) -> None:
        """Keep the first ``length`` tokens."""
        seq = self._seq(handle)
        if not 0 <= length <= len(seq):
            raise HandleError(f"{self.name}: truncate length {length} outside [0, {len(seq)}]")
        del seq[length:]

    def close(self, handle: object) -> None:
        """Free the handle; later use raises HandleError."""
        self._seq(handle)
        del self._seqs[handle]  # type: ignore[arg-type]


def make_model() -> BigramModel:
    """The zero-argument factory the conformance suite calls once per check."""
    return BigramModel(vocab_size=50, seed=0, context_size=64)


def make_draft() -> BigramModel:
    """A draft for the lossless half: another table over the same vocabulary."""
    return BigramModel(vocab_size=50, seed=1, context_size=64)


def reference_logits(context: tuple[int, ...]) -> np.ndarray:
    """An independent reference scorer for the ``reference_logits`` check: the row
    after ``context``, computed from the seed without any handle (a real backend would
    run the same weights through transformers here, or read stored logits)."""
    table = np.random.default_rng(0).standard_normal((50, 50)).astype(np.float32)
    return table[context[-1]]


if __name__ == "__main__":
    import conformance

    print(conformance.check_model(make_model).format_table())
