"""Query parameters a route does not declare, or repeats where it takes one value, are refused.

FastAPI reads the parameters a route declares and ignores the rest, and of a repeated scalar
it keeps the last value. A typo in an option was then a 200 that did something else than
asked (``exclude_same_patients=true`` returned the upload's own patient's other images, which
the caller meant to leave out), and ``k=0&k=5`` passed where ``k=5&k=0`` was refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from typing import Any, get_args, get_origin

from fastapi import Request

from serve.guard import ApiError, shown

__all__ = ["known_query"]


async def known_query(request: Request) -> None:
    """Route dependency: 422 ``invalid_parameter`` for an undeclared or repeated parameter."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return
    declared = {p.alias: _repeatable(p.field_info.annotation) for p in _query_params(dependant)}
    counts = Counter(name for name, _ in request.query_params.multi_items())
    for name, n in counts.items():
        if name not in declared:
            takes = ", ".join(sorted(declared)) or "none"
            raise ApiError(
                422,
                f"unknown query parameter {shown(name)} (this route takes: {takes})",
                "invalid_parameter",
            )
        if n > 1 and not declared[name]:
            raise ApiError(
                422,
                f"query parameter {name!r} given {n} times; it takes one value",
                "invalid_parameter",
            )


def _query_params(dependant: Any) -> list[Any]:
    """The route's query parameters, its dependencies' included."""
    found = list(dependant.query_params)
    for sub in dependant.dependencies:
        found += _query_params(sub)
    return found


def _repeatable(annotation: Any) -> bool:
    """Whether a parameter takes several values (a list, set, tuple or Sequence; possibly
    optional)."""
    origin = get_origin(annotation)
    if isinstance(origin, type) and issubclass(origin, Collection) and origin not in (str, bytes):
        return True
    return any(_repeatable(a) for a in get_args(annotation) if a is not type(None))
