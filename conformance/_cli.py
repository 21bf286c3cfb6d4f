"""``python -m conformance``: run the suite from the command line and print the report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from typing import Any

from ssd_core import ConfigError, SSDError, UnknownOptionError
from ssd_core.app import available_backends

from ._backends import check_backend
from ._report import Report, Status
from ._runner import CHECK_NAMES, check_model, describe_checks
from ._watchdog import DEFAULT_TIMEOUT
from .lossless import DEFAULT_MODES, DEFAULT_PROCESSORS, check_lossless, lossless_plan

__all__ = ["main"]

EPILOG = """\
examples:
  python -m conformance mypkg.backend:make_tiny_model --quick
  python -m conformance --backend reference
  python -m conformance --backend all --full
  python -m conformance --backend reference --args vocab=32,order=3,context=16
  python -m conformance mypkg.backend:make_target --draft mypkg.backend:make_draft
  python -m conformance mypkg.backend:make_target --draft mypkg.backend:make_draft \
      --full --samples 8000 --processors T1,topp0.8 --exact-ids 3,7,11
  python -m conformance mypkg.backend:make_model --reference mypkg.hf_reference:logits

exit status: 0 every report passed (a backend whose engine is not installed is
reported as SKIPPED), 1 a check failed, 2 bad usage."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Check a backend's models against the ssd_core Model protocol.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "factory",
        nargs="?",
        help="package.module:callable returning a fresh model (zero arguments)",
    )
    ap.add_argument(
        "--draft",
        metavar="FACTORY",
        help="also run the lossless half (check_lossless): greedy identity AR == SD == SSD "
        "and G-tests of every mode and sampling processor, with FACTORY "
        "(package.module:callable) building the draft and the positional factory the target",
    )
    ap.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="NAME",
        help="check a registered backend on its default model ('all' for every "
        "registered backend); repeatable",
    )
    ap.add_argument(
        "--args",
        default=None,
        help="model spec arguments for --backend "
        "(the text after NAME:); default: the backend's default target",
    )
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine option passed to the backend's load(); repeatable",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", dest="quick", action="store_true", default=True, help="short run (default)"
    )
    mode.add_argument("--full", dest="quick", action="store_false", help="long run")
    ap.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="absolute logits tolerance (default: by dtype: float64 0, float32 1e-4)",
    )
    ap.add_argument(
        "--batch-tolerance",
        type=float,
        default=None,
        help="tolerance for batched vs separate scoring (default: --tolerance)",
    )
    ap.add_argument(
        "--reference",
        metavar="MODULE:NAME",
        help="a reference scorer for the reference_logits check: a callable "
        "context -> logits (e.g. the same weights in transformers) or a mapping of stored "
        "logits (context tuple -> row); without it the suite compares the model only with "
        "itself and cannot see rescaled logits",
    )
    ap.add_argument(
        "--reference-tolerance",
        type=float,
        default=None,
        help="tolerance against the reference, on log-probabilities (default: the larger "
        "of --tolerance and --batch-tolerance)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="time limit per check (default %(default)g); a check past it fails as timed "
        "out and the rest are not run; 0: no limit",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--handles", type=int, default=32, help="handles open at once (default 32)")
    ap.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the reports as JSON to PATH ('-': JSON to stdout instead of tables)",
    )
    lossless = ap.add_argument_group(
        "lossless half (with --draft)",
        "--quick runs SD, SSD-neural and SSD-fast at T=1 with 6 bins, --full every mode "
        "under every processor with 16 bins; unless --samples is given each test gets "
        "enough samples for power >= 0.9 at binned TV --effect-tv, and the report states "
        "the power (a run below 0.9 is labelled a smoke test)",
    )
    lossless.add_argument("--samples", type=int, default=None, help="samples per test")
    lossless.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated modes; known: {', '.join(DEFAULT_MODES)}",
    )
    lossless.add_argument(
        "--processors",
        default=None,
        help=f"comma-separated sampling processors; known: {', '.join(DEFAULT_PROCESSORS)}",
    )
    lossless.add_argument(
        "--bins", type=int, default=None, help="bins per G-test (default 6 quick, 16 full)"
    )
    lossless.add_argument(
        "--effect-tv",
        type=float,
        default=0.05,
        help="binned TV the power refers to (default %(default)g)",
    )
    lossless.add_argument(
        "--exact-ids",
        default=None,
        metavar="IDS",
        help="2-4 comma-separated token ids: also enumerate SD and SSD exactly on the "
        "models restricted to them",
    )
    ap.add_argument("--list", action="store_true", help="list the checks and exit")
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated checks to run; known: " + ", ".join(CHECK_NAMES),
    )
    return ap


def _value(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _load_object(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{target!r} must look like package.module:name")
    obj: Any = import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _load_factory(target: str) -> Callable[[], Any]:
    obj = _load_object(target)
    if not callable(obj):
        raise ConfigError(f"{target!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"--exact-ids {text!r} must be comma-separated token ids") from None
    if not 2 <= len(ids) <= 4 or len(set(ids)) != len(ids):
        raise ConfigError(f"--exact-ids needs 2-4 distinct token ids, got {ids}")
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        The exit status: 0 passed (or skipped for a missing engine), 1 failed, 2 usage.
    """
    ap = _parser()
    ns = ap.parse_args(argv)
    if ns.list:
        for name, doc in describe_checks().items():
            print(f"{name:<20} {doc}")
        return 0
    if not ns.factory and not ns.backend:
        ap.error("give a factory (package.module:callable) or --backend NAME")
    if ns.timeout < 0:
        ap.error(f"--timeout must be >= 0 seconds, got {ns.timeout:g}")
    kwargs: dict[str, Any] = dict(
        tolerance=ns.tolerance,
        batch_tolerance=ns.batch_tolerance,
        quick=ns.quick,
        seed=ns.seed,
        n_handles=ns.handles,
        reference_tolerance=ns.reference_tolerance,
        timeout=ns.timeout or None,
    )
    lossless_flags = [
        flag
        for flag, value in (
            ("--samples", ns.samples),
            ("--modes", ns.modes),
            ("--processors", ns.processors),
            ("--bins", ns.bins),
            ("--exact-ids", ns.exact_ids),
        )
        if value is not None
    ]
    if lossless_flags and not ns.draft:
        ap.error(f"{', '.join(lossless_flags)} set the lossless half; give --draft FACTORY too")
    if ns.only:
        kwargs["only"] = [c.strip() for c in ns.only.split(",") if c.strip()]
    options = {}
    for item in ns.option:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--option {item!r} is not KEY=VALUE")
        options[key.strip()] = _value(value.strip())
    names = list(
        dict.fromkeys(
            n for b in ns.backend for n in (sorted(available_backends()) if b == "all" else [b])
        )
    )
    if ns.args is not None and len(names) != 1:
        ap.error("--args names one backend's model; give exactly one --backend with it")
    reports: list[Report] = []
    if ns.draft and not ns.factory:
        ap.error("--draft needs the target factory as the positional argument")
    try:
        if ns.reference:
            reference = _load_object(ns.reference)
            if not (callable(reference) or isinstance(reference, Mapping)):
                raise ConfigError(f"--reference {ns.reference!r} is neither callable nor a mapping")
            kwargs["reference"] = reference
        plan = None
        if ns.draft:
            plan = lossless_plan(
                quick=ns.quick,
                samples=ns.samples,
                modes=_names(ns.modes),
                processors=_names(ns.processors),
                max_bins=ns.bins,
                effect_tv=ns.effect_tv,
            )
            if ns.exact_ids is not None:
                plan["exact_ids"] = _ids(ns.exact_ids)
        if ns.factory:
            reports.append(check_model(_load_factory(ns.factory), **kwargs))
        if ns.draft and plan is not None:
            reports.append(
                check_lossless(
                    _load_factory(ns.factory),
                    _load_factory(ns.draft),
                    seed=ns.seed,
                    subject=f"{ns.factory} with draft {ns.draft}",
                    timeout=kwargs["timeout"],
                    **plan,
                )
            )
        for name in names:
            reports.append(check_backend(name, args=ns.args, options=options, **kwargs))
    except UnknownOptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (SSDError, ImportError, AttributeError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    data = json.dumps([r.as_dict() for r in reports], indent=2)
    if ns.json == "-":
        print(data)
    else:
        for report in reports:
            print(report.format_table())
            print()
        if ns.json:
            with open(ns.json, "w", encoding="utf-8") as fh:
                fh.write(data + "\n")
    return 1 if any(r.status is Status.FAILED for r in reports) else 0
