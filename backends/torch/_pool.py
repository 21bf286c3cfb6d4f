"""The KV pool: paged, preallocated KV storage shared by all handles of one model.

Theory of operation. Every layer has one key arena and one value arena,
``[kv_heads, capacity, head_dim]`` on the device of that layer (allocated lazily from
the first keys the layer writes, so a model spread over several GPUs gets each layer's
arena on that layer's device). Slots are grouped in *blocks* of ``block_size``
consecutive slots. A handle owns a *block table*: block ``table[i]`` holds its
positions ``i * block_size ... (i + 1) * block_size - 1``. Blocks are reference
counted, so

* ``fork(h, n)`` copies the first ``ceil(n / block_size)`` entries of the table and
  bumps their counts -- no KV is copied;
* ``truncate(h, n)`` drops table entries past ``n`` -- O(tokens dropped / block_size);
* writing position ``p`` into a block others share is allowed when ``p`` is the block's
  frontier (``filled[b] == p % block_size``: no sharer holds a token there yet);
  otherwise the block is copied first (copy-on-write of at most ``block_size - 1``
  slots), which happens once per branch that diverges inside a block.

Attention reads the arenas in place: a call's keys are slots ``[0, span)`` of the arena
(``span`` = the highest block any row of the call uses, plus one, times the block size;
free blocks are reused lowest id first to keep it small), and a mask built on the
device from the block tables says which slots each query sees
(:func:`tree_mask`). So N branches of a tree step share their prefix in memory and in
the attention kernel's reads, and nothing is rebuilt, padded or stacked per call.

Writes are planned on the host (:meth:`KVPool.plan`), the device work runs, and the
plan is then committed or aborted: a failed forward leaves every handle as it was (its
writes landed only in slots no handle can see).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence

import attrs
import torch

__all__ = ["KVPool", "Plan", "Stats", "tree_mask"]

log = logging.getLogger(__name__)


@attrs.define
class Stats:
    """Counters of one model's data movement (host-side bookkeeping, no syncs).

    Attributes:
        calls: ``extend`` calls.
        forwards: network forward passes.
        tokens: tokens run through the network (new plus lazily prefilled).
        logit_rows: logits rows returned.
        kv_written_bytes: K/V bytes stored for new tokens (written once, in place).
        kv_cow_bytes: K/V bytes copied because a branch diverged inside a shared block.
        kv_gather_bytes: K/V bytes gathered into dense tensors for plain modules with
            the legacy (non-pool) signature.
        kv_grow_bytes: K/V bytes copied when the pool grew.
        upload_bytes: host-to-device bytes (ids, positions, slots, block tables).
        logits_bytes: bytes of logits handed to the caller.
    """

    calls: int = 0
    forwards: int = 0
    tokens: int = 0
    logit_rows: int = 0
    kv_written_bytes: int = 0
    kv_cow_bytes: int = 0
    kv_gather_bytes: int = 0
    kv_grow_bytes: int = 0
    upload_bytes: int = 0
    logits_bytes: int = 0

    @property
    def kv_copied_bytes(self) -> int:
        """KV bytes copied (not counting first writes): copy-on-write, gathers, growth."""
        return self.kv_cow_bytes + self.kv_gather_bytes + self.kv_grow_bytes

    def reset(self) -> None:
        """Zero every counter."""
        for field in attrs.fields(type(self)):
            setattr(self, field.name, 0)

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (plus ``kv_copied_bytes``)."""
        out = attrs.asdict(self)
        out["kv_copied_bytes"] = self.kv_copied_bytes
        return out


@attrs.define
class Plan:
    """Where one call's tokens go, and what must happen before they are written.

    Attributes:
        tables: the block table of every row after the call.
        slots: per row, the slot of each position written (``computed ...``), in order.
        cow: ``(source block, destination block, slots to copy)`` copies to run first.
        fresh: blocks allocated by this plan (freed again on abort).
        released: blocks a row stopped referencing (copy-on-write), decremented on commit.
        filled: block -> new frontier, applied on commit.
    """

    tables: list[list[int]]
    slots: list[list[int]]
    cow: list[tuple[int, int, int]] = attrs.field(factory=list)
    fresh: list[int] = attrs.field(factory=list)
    released: list[int] = attrs.field(factory=list)
    filled: dict[int, int] = attrs.field(factory=dict)


class KVPool:
    """Paged KV storage for one model (see the module docstring).

    Args:
        block_size: slots per block.
        initial_tokens: slots to allocate when the first layer writes (rounded up to
            whole blocks); the pool doubles when it runs out.
        stats: where to count bytes.
    """

    def __init__(
        self, *, block_size: int = 16, initial_tokens: int = 1024, stats: Stats | None = None
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        self.stats = stats if stats is not None else Stats()
        self._blocks = max(1, -(-int(initial_tokens) // self.block_size))
        self._ref = [0] * self._blocks
        self._filled = [0] * self._blocks
        self._free = list(range(self._blocks))
        heapq.heapify(self._free)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    # -- sizes -----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Slots per layer."""
        return self._blocks * self.block_size

    @property
    def blocks_in_use(self) -> int:
        """Blocks referenced by at least one handle."""
        return self._blocks - len(self._free)

    def refcount(self, block: int) -> int:
        """How many handles reference ``block``."""
        return self._ref[block]

    def bytes_per_slot(self) -> int:
        """K+V bytes of one slot over every allocated layer."""
        return sum(
            k[:, 0].numel() * k.element_size() + v[:, 0].numel() * v.element_size()
            for k, v in ((self.keys[i], self.values[i]) for i in self.keys)
        )

    # -- bookkeeping (host only) -----------------------------------------------------

    def _alloc(self) -> int:
        if not self._free:
            self._grow()
        block = heapq.heappop(self._free)
        self._ref[block] = 1
        self._filled[block] = 0
        return block

    def _decref(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 0:
            heapq.heappush(self._free, block)

    def _grow(self) -> None:
        old = self._blocks
        self._blocks = 2 * old
        self._ref += [0] * old
        self._filled += [0] * old
        for b in range(old, self._blocks):
            heapq.heappush(self._free, b)
        for store in (self.keys, self.values):
            for layer, arena in store.items():
                bigger = arena.new_zeros((arena.shape[0], self.capacity, arena.shape[2]))
                bigger[:, : arena.shape[1]].copy_(arena)
                self.stats.kv_grow_bytes += arena.numel() * arena.element_size()
                store[layer] = bigger
        log.info("KV pool grown to %d slots per layer", self.capacity)

    def fork_table(self, table: Sequence[int], tokens: int) -> list[int]:
        """A new table sharing the blocks that hold the first ``tokens`` positions."""
        child = list(table[: -(-tokens // self.block_size)]) if tokens > 0 else []
        for b in child:
            self._ref[b] += 1
        return child

    def truncate_table(self, table: list[int], tokens: int) -> None:
        """Drop (in place) the blocks of ``table`` past the first ``tokens`` positions."""
        keep = -(-tokens // self.block_size) if tokens > 0 else 0
        for b in table[keep:]:
            self._decref(b)
        del table[keep:]

    def release(self, table: list[int]) -> None:
        """Drop every block of ``table`` (a closed handle)."""
        self.truncate_table(table, 0)

    def plan(
        self, rows: Sequence[tuple[Sequence[int], int, int]], pending: dict[int, int] | None = None
    ) -> Plan:
        """Assign a slot to every position the call writes.

        Args:
            rows: ``(table, computed, n)`` per row: the row writes positions
                ``computed ... computed + n - 1``. Rows must be distinct handles.
            pending: the frontiers of an earlier, not yet committed plan of the same
                call (``plan.filled``), when a call runs as several passes.

        Returns:
            The :class:`Plan`; nothing is committed until :meth:`commit`.
        """
        bs = self.block_size
        plan = Plan(tables=[], slots=[], filled=dict(pending or {}))
        for table, computed, n in rows:
            table = list(table)
            owned: set[int] = set()
            slots = []
            for p in range(computed, computed + n):
                i, off = divmod(p, bs)
                if i == len(table):
                    b = self._alloc()
                    plan.fresh.append(b)
                    table.append(b)
                    owned.add(b)
                elif (b := table[i]) not in owned:
                    frontier = plan.filled.get(b, self._filled[b])
                    if self._ref[b] == 1 or frontier == off:
                        owned.add(b)  # ours alone, or nobody holds a token at off yet
                    else:
                        nb = self._alloc()
                        plan.fresh.append(nb)
                        plan.cow.append((b, nb, off))
                        plan.released.append(b)
                        table[i] = b = nb
                        owned.add(nb)
                plan.filled[b] = off + 1
                slots.append(b * bs + off)
            plan.tables.append(table)
            plan.slots.append(slots)
        return plan

    def commit(self, plan: Plan) -> None:
        """Make a planned call permanent (after its device work succeeded)."""
        for b, f in plan.filled.items():
            self._filled[b] = f
        for b in plan.released:
            self._decref(b)

    def abort(self, plan: Plan) -> None:
        """Forget a planned call: free its fresh blocks."""
        for b in plan.fresh:
            self._decref(b)

    # -- device work -----------------------------------------------------------------

    def run_cow(self, plan: Plan) -> None:
        """Copy the shared part of each copied-on-write block (queued, no host sync)."""
        bs = self.block_size
        for src, dst, n in plan.cow:
            if n == 0:
                continue
            for store in (self.keys, self.values):
                for arena in store.values():
                    arena[:, dst * bs : dst * bs + n].copy_(arena[:, src * bs : src * bs + n])
                    self.stats.kv_cow_bytes += arena[:, :n].numel() * arena.element_size()

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """Store ``keys``/``values`` ``[heads, T, head_dim]`` of ``layer`` at ``slots`` ``[T]``."""
        if layer not in self.keys:
            # zeros, not empty: masked slots still enter the attention product (weight 0),
            # and 0 * NaN from uninitialised memory would poison every row
            self.keys[layer] = keys.new_zeros((keys.shape[0], self.capacity, keys.shape[2]))
            self.values[layer] = values.new_zeros((values.shape[0], self.capacity, values.shape[2]))
        k, v = self.keys[layer], self.values[layer]
        k.index_copy_(1, slots, keys.to(k.dtype))
        v.index_copy_(1, slots, values.to(v.dtype))
        self.stats.kv_written_bytes += (
            keys.numel() * k.element_size() + values.numel() * v.element_size()
        )

    def view(self, layer: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``[0, span)`` of ``layer`` as ``[1, heads, span, head_dim]`` views."""
        return self.keys[layer][None, :, :span], self.values[layer][None, :, :span]

    def free(self) -> None:
        """Drop the arenas (the bookkeeping stays; used when the model is freed)."""
        self.keys.clear()
        self.values.clear()


def tree_mask(
    tables: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    *,
    span_blocks: int,
    block_size: int,
) -> torch.Tensor:
    """Which arena slots each query may attend to, built on the device.

    Query ``i`` (of row ``rows[i]``, at position ``positions[i]``) sees slot ``s`` iff
    the block holding ``s`` is in that row's table and the position it stores there is
    ``<= positions[i]``: its prefix, shared or not, and its own earlier new tokens.

    Args:
        tables: ``[R, max_blocks]`` block tables, ``-1`` padded.
        rows: ``[T]`` the row of each query.
        positions: ``[T]`` the position of each query.
        span_blocks: blocks ``[0, span_blocks)`` are in the attended span.
        block_size: slots per block.

    Returns:
        ``[T, span_blocks * block_size]`` bool, ``True`` where attention is allowed.
    """
    n_rows, width = tables.shape
    dev = tables.device
    # index of each block in each row's table (-1: not in the table)
    where = torch.full((n_rows, span_blocks + 1), -1, dtype=torch.long, device=dev)
    col = torch.where(tables >= 0, tables, span_blocks)
    order = torch.arange(width, device=dev).expand(n_rows, width)
    where.scatter_(1, col, order)
    where = where[:, :span_blocks].index_select(0, rows)  # [T, blocks], per query
    # slot j of a block at table index w holds position w * block_size + j: visible iff
    # w >= 0 and j <= position - w * block_size (compared block-wise: no [T, S] ints)
    limit = torch.where(where >= 0, positions[:, None] - where * block_size, -1)
    j = torch.arange(block_size, device=dev)
    return (j <= limit[:, :, None]).reshape(len(positions), span_blocks * block_size)
