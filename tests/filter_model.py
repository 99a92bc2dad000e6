"""A pure-Python reading of the metadata filter grammar, used by the tests as
an oracle for the core's evaluator (rust/core/src/memory/filter.rs): eq ne in
nin gt gte lt lte contains, and / or / not, dotted paths, optional ``$``
prefixes. A missing field satisfies only ``ne`` and ``nin``."""

from __future__ import annotations

from typing import Any, Optional

_OPS = {"eq", "ne", "in", "nin", "gt", "gte", "lt", "lte", "contains"}


def _json_eq(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_eq(v, b[k]) for k, v in a.items())
    return type(a) is type(b) and a == b


def _order(a: Any, b: Any) -> Optional[int]:
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        return (a > b) - (a < b)
    if isinstance(a, str) and isinstance(b, str):
        return (a > b) - (a < b)
    return None


def _apply(op: str, have: Any, want: Any) -> bool:
    if op == "eq":
        return _json_eq(have, want)
    if op == "ne":
        return not _json_eq(have, want)
    if op == "in":
        return isinstance(want, list) and any(_json_eq(have, w) for w in want)
    if op == "nin":
        return not (isinstance(want, list) and any(_json_eq(have, w) for w in want))
    if op == "contains":
        if isinstance(have, str) and isinstance(want, str):
            return want in have
        return isinstance(have, list) and any(_json_eq(x, want) for x in have)
    o = _order(have, want)
    if o is None:
        return False
    return {"gt": o > 0, "gte": o >= 0, "lt": o < 0, "lte": o <= 0}[op]


def matches_filter(flt: dict[str, Any], metadata: Optional[dict[str, Any]]) -> bool:
    """Whether ``metadata`` satisfies ``flt``."""
    if not isinstance(flt, dict):
        raise ValueError("a filter must be a dict")
    for key, val in flt.items():
        k = key[1:] if key.startswith("$") else key
        kl = k.lower()
        if kl in ("and", "or"):
            if not isinstance(val, list):
                raise ValueError(f"bad filter: {key} takes a list of filters")
            parts = [matches_filter(f, metadata) for f in val]
            if not (all(parts) if kl == "and" else any(parts)):
                return False
            continue
        if kl == "not":
            if matches_filter(val, metadata):
                return False
            continue
        if not key:
            raise ValueError("bad filter: empty field name")
        cur: Any = metadata
        for p in key.split("."):
            cur = cur.get(p, _MISSING) if isinstance(cur, dict) else _MISSING
            if cur is _MISSING:
                break
        if isinstance(val, dict) and val and all((o[1:] if o.startswith("$") else o) in _OPS for o in val):
            ops = [((o[1:] if o.startswith("$") else o), w) for o, w in val.items()]
        else:
            ops = [("eq", val)]
        for op, want in ops:
            if op in ("in", "nin") and not isinstance(want, list):
                raise ValueError(f"bad filter: {key}: {op} takes a list")
            ok = op in ("ne", "nin") if cur is _MISSING else _apply(op, cur, want)
            if not ok:
                return False
    return True


_MISSING = object()
