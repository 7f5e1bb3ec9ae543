"""One home per method (STYLE "wsss/methods/"): a :class:`Method` holds what is particular to it
— model build, training objective and pseudo labels, validation columns, evaluation protocols —
and the registry below is the only place that lists them. A fourth method is one new file here
plus one line in ``METHODS``."""
from __future__ import annotations

from .aream import AReAMMethod
from .base import IGNORE, Method, Protocol, Row, Schedule
from .baseline import BaselineMethod
from .more import MoReMethod

METHODS = {m.name: m for m in (BaselineMethod(), MoReMethod(), AReAMMethod())}

__all__ = ["IGNORE", "METHODS", "Method", "Protocol", "Row", "Schedule", "get_method"]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"model.method={name!r} is unknown; known: {', '.join(METHODS)}")
    return METHODS[name]
