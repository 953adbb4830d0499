"""The TOML reader: tomllib, or tomli before Python 3.11; ops.config,
ops.tomlwrite and ops.devadd take it from here.
"""

import sys
from typing import Any


def _import_tomllib() -> Any:
    """tomllib, without the 220 KB its import costs for nothing (3.11 and later).

    Why: tomllib's `class Output(NamedTuple)` has string annotations, which
    typing turns into ForwardRefs by compile()ing each, and the first
    compile() of a process builds every AST node type: 220 KB of RSS that an
    idle agent keeps for ever (docs/benchmarks.md, third round). While
    tomllib is imported, typing leaves string annotations as they are (what
    `from __future__ import annotations` gives any other class); nothing
    evaluates Output's. Only for that import, from the main thread at start.
    """
    import typing
    check = getattr(typing, "_type_check", None)
    if check is None or "tomllib" in sys.modules:   # another typing, or imported already
        import tomllib
        return tomllib

    def keep_strings(arg: Any, *args: Any, **kwargs: Any) -> Any:
        return arg if isinstance(arg, str) else check(arg, *args, **kwargs)
    typing._type_check = keep_strings   # type: ignore[attr-defined]
    try:
        import tomllib
    finally:
        typing._type_check = check   # type: ignore[attr-defined]
    return tomllib


# The one place that picks the TOML reader.
if sys.version_info >= (3, 11):
    tomllib = _import_tomllib()
else:  # pragma: no cover - exercised on old interpreters only
    import tomli as tomllib
