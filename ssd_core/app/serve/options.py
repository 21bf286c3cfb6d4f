"""The flags of ``ssd serve`` and the settings they make.

Cheap to import (no web framework): ``ssd_core.app.cli`` builds its parser from here.
The model and decoding flags are ``ssd generate``'s (:func:`add_model_args`,
:func:`add_decode_args`); the decoding flags become the defaults of requests that
leave a field out, with three serve-specific defaults:

* ``--temperature 1.0``, as the OpenAI API (``ssd generate`` defaults to greedy);
* ``--fallback neural``: with ``auto`` a request's tokens depend on timing and on the
  other requests in flight (Saguaro Thm 17), which would break the promise that a
  seeded request gives the same tokens whatever else the server does;
* no ``--seed``: a request without a seed gets a fresh random one, as with the OpenAI
  API; ``--seed S`` makes it ``S`` (identical requests then give identical answers).
"""

from __future__ import annotations

import argparse
import os

import attrs

from ssd_core import MODES, ConfigError

from ..common import add_decode_args, add_model_args

__all__ = ["DEFAULT_PORT", "RequestDefaults", "ServeOptions", "add_serve_args", "options_from"]

DEFAULT_PORT = 8000

#: The environment variable ``--api-key`` defaults to (keeps the key out of ``ps``).
API_KEY_ENV = "SSD_API_KEY"


@attrs.frozen(kw_only=True)
class RequestDefaults:
    """What a request gets for a field it leaves out."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    draft_temperature: float | None = None
    max_tokens: int = 256
    seed: int | None = None


def _non_negative(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name} must be >= 0, got {value}")


def _positive_seconds(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{attribute.name} must be > 0 seconds, got {value}")


@attrs.frozen(kw_only=True)
class ServeOptions:
    """How the server behaves (the engine's own settings live in the Engine).

    Attributes:
        served_model_name: the ``model`` clients name; ``None``: the target's name.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer``.
        max_queue: requests admitted beyond the engine's batch capacity; past it a
            request is answered 429 at once.
        shutdown_timeout: on SIGINT/SIGTERM, seconds in-flight requests get to finish
            before they are cancelled.
        defaults: values for fields a request leaves out.
    """

    served_model_name: str | None = None
    api_key: str | None = None
    max_queue: int = attrs.field(default=64, validator=_non_negative)
    shutdown_timeout: float = attrs.field(default=10.0, validator=_positive_seconds)
    defaults: RequestDefaults = attrs.field(factory=RequestDefaults)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``ssd serve``."""
    p.description = (
        "Serve the model over HTTP with the OpenAI API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics). The decoding flags set "
        "the defaults of requests that leave a field out; here --temperature defaults to "
        "1.0 (as the OpenAI API), --fallback to neural (seeded requests reproducible) and "
        "--max-new-tokens to 256. See docs/serving.md."
    )
    p.add_argument("--mode", choices=MODES, default="ssd")
    add_model_args(p)
    add_decode_args(p)
    g = p.add_argument_group("server")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    g.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="TCP port; 0 picks a free one (default: %(default)s)",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})",
    )
    g.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="most requests generating at once (default: %(default)s)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting beyond --max-batch before new ones get HTTP 429 (default: %(default)s)",
    )
    g.add_argument(
        "--served-model-name", help="the model name clients use (default: the target's name)"
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM (default: %(default)s)",
    )
    p.set_defaults(temperature=1.0, fallback="neural", seed=None, max_new_tokens=256)


def options_from(args: argparse.Namespace) -> ServeOptions:
    """The :class:`ServeOptions` the parsed flags describe.

    Raises:
        ConfigError: a value out of range.
    """
    return ServeOptions(
        served_model_name=args.served_model_name,
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        shutdown_timeout=args.shutdown_timeout,
        defaults=RequestDefaults(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            draft_temperature=args.draft_temperature,
            max_tokens=args.max_new_tokens,
            seed=args.seed,
        ),
    )
