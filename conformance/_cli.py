"""``python -m conformance``: run the suite from the command line and print the report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import Any

from ssd_core import ConfigError, SSDError, UnknownOptionError
from ssd_core.app import available_backends

from ._backends import check_backend
from ._report import Report, Status
from ._runner import CHECK_NAMES, check_model, describe_checks

__all__ = ["main"]

EPILOG = """\
examples:
  python -m conformance mypkg.backend:make_tiny_model --quick
  python -m conformance --backend reference
  python -m conformance --backend all --full
  python -m conformance --backend reference --args vocab=32,order=3,context=16
  python -m conformance mypkg.backend:make_target --draft mypkg.backend:make_draft

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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--handles", type=int, default=32, help="handles open at once (default 32)")
    ap.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the reports as JSON to PATH ('-': JSON to stdout instead of tables)",
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


def _load_factory(target: str) -> Callable[[], Any]:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"factory {target!r} must look like package.module:callable")
    obj: Any = import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{target!r} is not callable")
    return obj  # type: ignore[no-any-return]


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
    kwargs: dict[str, Any] = dict(
        tolerance=ns.tolerance,
        batch_tolerance=ns.batch_tolerance,
        quick=ns.quick,
        seed=ns.seed,
        n_handles=ns.handles,
    )
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
    try:
        if ns.factory:
            reports.append(check_model(_load_factory(ns.factory), **kwargs))
        if ns.draft:
            if not ns.factory:
                ap.error("--draft needs the target factory as the positional argument")
            from .lossless import DEFAULT_PROCESSORS, check_lossless

            procs = dict(list(DEFAULT_PROCESSORS.items())[:2]) if ns.quick else None
            reports.append(
                check_lossless(
                    _load_factory(ns.factory),
                    _load_factory(ns.draft),
                    samples=1500 if ns.quick else 4000,
                    processors=procs,
                    seed=ns.seed,
                    subject=f"{ns.factory} with draft {ns.draft}",
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
