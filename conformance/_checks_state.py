"""Checks on handle state: KV correctness, batching, forks, truncation, closing.

Most compare what a handle returns with :meth:`Probe.fresh` -- the logits a brand-new
handle gives for the same tokens -- so a backend is only ever compared with itself.
"""

from __future__ import annotations

from ssd_core import CapacityError, HandleError

from ._checks_output import seq_len
from ._probe import Fault, Probe
from ._settings import Settings

__all__ = [
    "check_batched_vs_separate",
    "check_close",
    "check_determinism",
    "check_extend_vs_prefill",
    "check_fork_independence",
    "check_fork_tree",
    "check_handle_errors",
    "check_many_handles",
    "check_truncate",
]


def _figure(p: Probe) -> str:
    return f"max|diff| {p.max_diff:.3g}"


def check_determinism(p: Probe, s: Settings) -> str:
    """The same tokens give the same logits on different handles, before and after other work."""
    seq = p.tokens(seq_len(p, s))
    cut = len(seq) // 2
    first = p.extend_one(p.open(seq[:cut], "open"), seq[cut:], "first handle")
    second = p.extend_one(p.open(seq[:cut], "open"), seq[cut:], "second handle")
    against = "the first handle holding the same tokens"
    p.compare(second, first, "second handle, same tokens", context_len=cut, against=against)
    busy = [p.open(p.tokens(3), "unrelated handle") for _ in range(3)]
    p.extend([(h, p.tokens(2)) for h in busy], "unrelated work")
    third = p.extend_one(p.open(seq[:cut], "open"), seq[cut:], "third handle after other work")
    p.compare(
        third,
        first,
        "third handle, same tokens, after unrelated work",
        context_len=cut,
        against=against,
    )
    return _figure(p)


def check_extend_vs_prefill(p: Probe, s: Settings) -> str:
    """Multi-token extends, prefills and chunked extends all equal one-token extends.

    The baseline for position ``j`` is a fresh handle: ``open(first j tokens)`` then
    ``extend`` of token ``j`` alone. Against it: one extend of the whole sequence from
    empty, ``open(prefix) + extend(rest)`` at several split points, token-by-token
    extends of one handle, and random-size chunks.
    """
    seq = p.tokens(seq_len(p, s))
    n = len(seq)
    base = p.fresh_rows([], seq)
    against = "fresh handles (open of the first j tokens, then extend of token j alone)"
    full = p.extend_one(p.open([], "open([])"), seq, f"extend of all {n} tokens from empty")
    p.compare(full, base, f"open([]) + one extend of {n} tokens", context_len=0, against=against)
    splits = range(1, n) if not s.quick else sorted({1, n // 2, n - 1} & set(range(1, n)))
    for cut in splits:
        h = p.open(seq[:cut], f"open({cut} tokens)")
        got = p.extend_one(h, seq[cut:], f"extend of {n - cut} tokens after open({cut})")
        p.compare(
            got,
            base[cut:],
            f"open({cut} tokens) + extend({n - cut} tokens)",
            context_len=cut,
            against=against,
        )
    step = p.open([], "open([]) for token-by-token extends")
    for j, tok in enumerate(seq):
        got = p.extend_one(step, [tok], f"token-by-token extend #{j}")
        p.compare(
            got,
            base[j : j + 1],
            f"token-by-token extend #{j} of one handle",
            context_len=j,
            against=against,
        )
    chunked = p.open([], "open([]) for chunked extends")
    pos = 0
    while pos < n:
        size = int(p.rng.integers(1, 5))
        got = p.extend_one(chunked, seq[pos : pos + size], f"chunk of {size} at {pos}")
        p.compare(
            got,
            base[pos : pos + size],
            f"extend of a {len(got)}-token chunk at position {pos}",
            context_len=pos,
            against=against,
        )
        pos += size
    return _figure(p)


def check_batched_vs_separate(p: Probe, s: Settings) -> str:
    """A request scored in a batch equals the same request scored alone, in batches of 2 and more.

    Batches of 2, 3 and all the requests (4 quick, 8 full), each in order and reversed,
    on fresh handles. Rows that are right but returned in the wrong places (two
    requests swapped) are reported as rows in the wrong order, naming the requests.
    """
    n_req = 4 if s.quick else 8
    length = seq_len(p, s)
    prompts = [p.tokens(int(p.rng.integers(0, length))) for _ in range(n_req)]
    news = [p.tokens(int(p.rng.integers(1, 5))) for _ in range(n_req)]
    alone = [
        p.extend_one(p.open(pr, "open"), nw, f"request {i} alone")
        for i, (pr, nw) in enumerate(zip(prompts, news, strict=True))
    ]
    for size in dict.fromkeys((2, 3, n_req)):
        for order_name, order in (
            ("in order", list(range(size))),
            ("reversed", list(reversed(range(size)))),
        ):
            handles = {i: p.open(prompts[i], "open") for i in order}
            what = f"batch of {size} requests ({order_name})"
            out = p.extend([(handles[i], news[i]) for i in order], what)
            p.compare_batch(
                out,
                [alone[i] for i in order],
                what,
                labels=[f"request {i} (handle {handles[i]!r})" for i in order],
                context_lens=[len(prompts[i]) for i in order],
                tolerance=p.batch_tolerance,
                against="the same request extended alone (logits depend on what else is in "
                "the batch)",
            )
            for i in order:
                p.close(handles[i], "close")
    return _figure(p)


def check_fork_independence(p: Probe, s: Settings) -> str:
    """Writing to a fork never changes its parent or siblings, and vice versa."""
    base = p.tokens(max(2, seq_len(p, s) - 3))
    n, k = len(base), len(base) // 2
    parent = p.open(base, f"open({n} tokens) as the parent")
    child = p.fork(parent, k, f"fork(parent, {k})")
    twin = p.fork(parent, n, f"fork(parent, {n}) (full copy)")
    x, y, z, w = p.tokens(2), p.tokens(2), p.tokens(2), p.tokens(1)
    p.expect_rows(
        child,
        x,
        base[:k],
        f"extend of the child fork(parent, {k})",
        explain=[("a handle still holding all the parent's tokens", base)],
    )
    p.expect_rows(
        parent,
        y,
        base,
        "parent extended after its child was extended",
        explain=[
            (
                "a handle holding the child's tokens: the fork shares state "
                "(KV cache) with its parent",
                base[:k] + x,
            )
        ],
    )
    p.expect_rows(
        twin,
        z,
        base,
        "sibling fork extended after parent and child were",
        explain=[
            (
                "a handle holding the parent's new tokens: the fork shares state with its parent",
                base + y,
            ),
            ("a handle holding the other child's tokens: siblings share state", base[:k] + x),
        ],
    )
    p.truncate(twin, 1, "truncate(sibling fork, 1)")
    p.expect_rows(twin, w, base[:1], "sibling fork extended after truncate(sibling, 1)")
    p.expect_rows(
        parent,
        w,
        base + y,
        "parent extended after its fork was truncated to 1 and extended",
        explain=[("the fork's tokens: the fork shares state with its parent", base[:1] + w)],
    )
    twin_now = base[:1] + w
    p.truncate(parent, 1, "truncate(parent, 1)")
    p.expect_rows(parent, w, base[:1], "parent extended after truncate(parent, 1)")
    p.expect_rows(
        child,
        w,
        base[:k] + x,
        "child extended after the parent was truncated and re-extended (a fork "
        "must not see its parent's later changes)",
        explain=[("the parent's tokens: the fork shares state with its parent", base[:1] + w)],
    )
    grandchild = p.fork(child, k + 1, f"fork(child, {k + 1})")
    p.close(child, "close(child)")
    p.expect_rows(
        grandchild,
        w,
        (base[:k] + x)[: k + 1],
        "grandchild extended after its parent (the child) was closed",
    )
    p.expect_rows(twin, w, twin_now, "sibling extended after the other child was closed")
    return _figure(p)


def check_fork_tree(p: Probe, s: Settings) -> str:
    """The tree-decoding pattern: many forks of one handle, stepped together one token each.

    This is how the speculative core drives a draft: fork the committed sequence at
    several lengths (one branch per predicted verification outcome), then extend every
    branch by one token per step in a single batch.
    """
    room = p.model.context_size
    base = p.tokens(max(2, seq_len(p, s) - 4))
    depth = 3 if s.quick else 5
    if room is not None:
        depth = max(1, min(depth, int(room) - len(base) - 2))
    width = max(1, min(s.n_handles - 2, 8 if s.quick else 16))
    parent = p.open(base, f"open({len(base)} tokens) as the committed sequence")
    lengths = [max(0, len(base) - (i % 3)) for i in range(width)]
    branches = [
        p.fork(parent, n, f"fork(parent, {n}) as branch {i}") for i, n in enumerate(lengths)
    ]
    held = [base[:n] for n in lengths]
    for step in range(depth):
        toks = [p.tokens(1) for _ in branches]
        what = f"tree step {step}: {width} branches x 1 token in one extend"
        out = p.extend(list(zip(branches, toks, strict=True)), what)
        p.compare_batch(
            out,
            [p.fresh_rows(held[i], toks[i]) for i in range(width)],
            what,
            labels=[f"branch {i} (forked at {lengths[i]})" for i in range(width)],
            context_lens=[len(h) for h in held],
            tolerance=max(p.tolerance, p.batch_tolerance),
        )
        held = [held[i] + toks[i] for i in range(width)]
    for i, b in enumerate(branches):
        p.close(b, f"close(branch {i})")
    p.expect_rows(
        parent,
        p.tokens(2),
        base,
        "parent extended after its tree of forks was stepped and closed",
    )
    return f"{width}x{depth} tree, max|diff| {p.max_diff:.3g}"


def check_truncate(p: Probe, s: Settings) -> str:
    """``truncate(h, k)`` then extend equals a fresh handle holding the first ``k`` tokens."""
    seq = p.tokens(seq_len(p, s))
    n = len(seq)
    h = p.open(seq, f"open({n} tokens)")
    lengths = [n, n - 1, n // 2, 1, 0] if s.quick else list(range(n, -1, -1))
    for k in dict.fromkeys(x for x in lengths if x >= 0):
        p.truncate(h, k, f"truncate(handle, {k}) of a {n}-token handle")
        new = p.tokens(int(p.rng.integers(1, 4)))
        explain = (
            [(f"a handle holding {k + 1} tokens (truncate kept one token too many)", seq[: k + 1])]
            if k < n
            else []
        )
        if k >= 1:
            explain.append(
                (f"a handle holding {k - 1} tokens (truncate kept one token too few)", seq[: k - 1])
            )
        p.expect_rows(
            h,
            new,
            seq[:k],
            f"extend of {len(new)} after truncate(handle, {k}) of a {n}-token handle",
            explain=explain,
        )
        p.truncate(h, k, f"truncate(handle, {k}) again, undoing the extend")
        if k < n:
            p.expect_rows(
                h,
                seq[k:],
                seq[:k],
                f"re-extend of the original {n - k} tokens after truncate(handle, {k})",
            )
    return _figure(p)


def check_close(p: Probe, s: Settings) -> str:
    """A closed handle raises HandleError everywhere; closing releases resources."""
    prompt = p.tokens(3)
    h = p.open(prompt, "open(3 tokens)")
    keep = p.open(prompt, "open(3 tokens), a second handle")
    p.close(h, "close(handle)")
    p.expect_raise(HandleError, lambda: p.model.extend([(h, [0])]), "extend of a closed handle")
    p.expect_raise(HandleError, lambda: p.model.fork(h, 1), "fork of a closed handle")
    p.expect_raise(HandleError, lambda: p.model.truncate(h, 1), "truncate of a closed handle")
    p.expect_raise(HandleError, lambda: p.model.close(h), "second close of a handle")
    p.expect_raise(
        HandleError,
        lambda: p.model.extend([(keep, [1]), (h, [0])]),
        "batch holding a closed handle",
    )
    p.expect_rows(
        keep,
        p.tokens(2),
        prompt,
        "other handle extended after closing one (and after a rejected batch)",
    )
    cycles = 2 * max(s.n_handles, 16) if s.quick else 8 * max(s.n_handles, 16)
    for i in range(cycles):
        p.step = f"open/extend/close cycle {i} of {cycles}"
        try:
            g = p.open(p.tokens(2), p.step)
        except CapacityError as exc:
            raise Fault(
                f"{p.step}: open raised CapacityError after {i} closed handles; "
                f"close() does not release them ({exc})"
            ) from exc
        p.extend_one(g, p.tokens(1), p.step)
        p.close(g, p.step)
    return f"{cycles} open/close cycles"


def check_handle_errors(p: Probe, s: Settings) -> str:
    """Unknown handles and lengths beyond a handle's raise HandleError."""
    h = p.open(p.tokens(4), "open(4 tokens)")
    stranger = ("not", "a", "handle", 424242)
    p.expect_raise(
        HandleError,
        lambda: p.model.extend([(stranger, [0])]),
        "extend of a handle the model never made",
    )
    p.expect_raise(HandleError, lambda: p.model.fork(h, 5), "fork(4-token handle, 5)")
    p.expect_raise(HandleError, lambda: p.model.fork(h, -1), "fork(handle, -1)")
    p.expect_raise(HandleError, lambda: p.model.truncate(h, 5), "truncate(4-token handle, 5)")
    p.expect_raise(HandleError, lambda: p.model.truncate(h, -1), "truncate(handle, -1)")
    p.expect_raise(HandleError, lambda: p.model.close(stranger), "close of an unknown handle")
    return "HandleError raised"


def check_many_handles(p: Probe, s: Settings) -> str:
    """``n_handles`` handles live at once, scored together and separately.

    The expected logits are computed first, so the check never needs more than
    ``n_handles`` handles at a time.
    """
    declared = getattr(p.model, "max_handles", None)
    n = min(s.n_handles, declared) if isinstance(declared, int) and declared > 0 else s.n_handles
    length = min(seq_len(p, s), 6)
    prompts = [p.tokens(int(p.rng.integers(0, length + 1))) for _ in range(n)]
    news = [p.tokens(int(p.rng.integers(1, 3))) for _ in range(n)]
    mores = [p.tokens(1) for _ in range(n)]
    # one fresh prefill per handle gives the rows of both of its extends
    both = [p.fresh_block(pr, nw + mo) for pr, nw, mo in zip(prompts, news, mores, strict=True)]
    want = [rows[: len(nw)] for rows, nw in zip(both, news, strict=True)]
    want_more = [rows[len(nw) :] for rows, nw in zip(both, news, strict=True)]
    handles = []
    for i, pr in enumerate(prompts):
        try:
            handles.append(p.open(pr, f"open of handle {i + 1} of {n}"))
        except CapacityError as exc:
            raise Fault(
                f"only {i} handles could be open at once ({exc}); the suite needs {n} (tree "
                f"decoding keeps one per branch); lower n_handles if the backend documents a "
                f"smaller limit"
            ) from exc
    if len(set(handles)) != n:
        raise Fault(f"{n} open() calls returned only {len(set(handles))} distinct handles")
    what = f"one batch over all {n} handles"
    out = p.extend(list(zip(handles, news, strict=True)), what)
    p.compare_batch(
        out,
        want,
        what,
        labels=[f"handle {i} ({handles[i]!r})" for i in range(n)],
        context_lens=[len(pr) for pr in prompts],
        tolerance=max(p.tolerance, p.batch_tolerance),
    )
    for i in p.rng.permutation(n):
        got = p.extend_one(handles[i], mores[i], f"handle {i} extended alone")
        p.compare(
            got,
            want_more[i],
            f"handle {i} extended alone, all {n} handles open",
            context_len=len(prompts[i]) + len(news[i]),
        )
    return f"{n} handles" + (" (the backend's max_handles)" if n < s.n_handles else "")
