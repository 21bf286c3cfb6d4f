"""A table of handles that each hold a token list: the bookkeeping shared by backends
whose "KV state" is just the tokens themselves (reference, n-gram) and by backends that
mirror their engine's state in Python (llama.cpp, torch)."""

from __future__ import annotations

from collections.abc import Sequence

from ssd_core import CapacityError, HandleError, InputError

__all__ = ["HandleTable"]


class HandleTable:
    """Integer handles to token lists, with the Model protocol's checks built in."""

    def __init__(self, *, owner: str, vocab_size: int, context_size: int | None) -> None:
        self._owner = owner
        self._vocab_size = vocab_size
        self._context_size = context_size
        self._tokens: dict[int, list[int]] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, handle: object) -> bool:
        return handle in self._tokens

    def handles(self) -> list[int]:
        return list(self._tokens)

    def check_tokens(self, tokens: Sequence[int]) -> list[int]:
        out = [int(t) for t in tokens]
        for t in out:
            if not 0 <= t < self._vocab_size:
                raise InputError(
                    f"{self._owner}: token id {t} is outside the vocabulary [0, {self._vocab_size})"
                )
        return out

    def tokens(self, handle: object) -> list[int]:
        """The live token list of ``handle`` (do not mutate it)."""
        try:
            return self._tokens[handle]  # type: ignore[index]
        except (KeyError, TypeError):
            raise HandleError(f"{self._owner}: unknown or closed handle {handle!r}") from None

    def check_room(self, handle: object, extra: int) -> None:
        if self._context_size is not None and len(self.tokens(handle)) + extra > self._context_size:
            raise CapacityError(
                f"{self._owner}: handle {handle!r} would hold "
                f"{len(self.tokens(handle)) + extra} tokens, context size is {self._context_size}"
            )

    def open(self, tokens: Sequence[int]) -> int:
        toks = self.check_tokens(tokens)
        if self._context_size is not None and len(toks) > self._context_size:
            raise CapacityError(
                f"{self._owner}: prompt of {len(toks)} tokens exceeds context size {self._context_size}"
            )
        handle = self._next
        self._next += 1
        self._tokens[handle] = toks
        return handle

    def check_length(self, handle: object, length: int) -> list[int]:
        toks = self.tokens(handle)
        if not 0 <= length <= len(toks):
            raise HandleError(
                f"{self._owner}: length {length} outside [0, {len(toks)}] for handle {handle!r}"
            )
        return toks

    def fork(self, handle: object, length: int) -> int:
        toks = self.check_length(handle, length)
        child = self._next
        self._next += 1
        self._tokens[child] = toks[:length]
        return child

    def truncate(self, handle: object, length: int) -> None:
        del self.check_length(handle, length)[length:]

    def close(self, handle: object) -> None:
        self.tokens(handle)
        del self._tokens[handle]  # type: ignore[arg-type]

    def check_extend(self, requests: Sequence[tuple[object, Sequence[int]]]) -> list[list[int]]:
        """Validate an extend batch; returns the new tokens per request (not yet appended)."""
        seen: set[object] = set()
        out = []
        for handle, toks in requests:
            self.tokens(handle)
            if handle in seen:
                raise InputError(f"{self._owner}: handle {handle!r} appears twice in one extend")
            seen.add(handle)
            new = self.check_tokens(toks)
            if not new:
                raise InputError(f"{self._owner}: extend of handle {handle!r} with no tokens")
            self.check_room(handle, len(new))
            out.append(new)
        return out
