"""The bundled prompt set that ``ssd bench`` and the backends' measurement tools use."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["default_prompts"]


def default_prompts() -> list[dict[str, Any]]:
    """The bundled prompt set: code, chat, math, prose and rewrite prompts.

    Returns:
        One dict per prompt with ``id``, ``kind``, ``text`` and ``chat`` (apply the
        chat template when the model has one). A fresh list on every call.
    """
    text = resources.files(__package__).joinpath("bench_prompts.json").read_text("utf-8")
    return [dict(p) for p in json.loads(text)["prompts"]]
