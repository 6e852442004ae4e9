"""The torch and transformers releases specplug is tested with, and one warning line outside them.

The ranges are the minor versions the tests ran green on: the locks (locks/*.txt: torch 2.13,
transformers 5.19 in the engine venvs and 5.23 in the main one) and `make test-latest` on
2026-11-29 (torch 2.14.1, transformers 5.24.0: every fast test passed).  Outside them specplug
may still work; the warning says where to look when it does not.
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

TESTED = {"torch": ((2, 13), (2, 14)), "transformers": ((5, 19), (5, 24))}


def _minor(text: str) -> tuple[int, int] | None:
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def untested(installed: dict[str, str] | None = None) -> list[str]:
    """'name X.Y.Z (tested A.B-C.D)' for each package outside its tested range."""
    out = []
    for name, (low, high) in TESTED.items():
        if installed is not None:
            found = installed.get(name)
        else:
            try:
                found = version(name)
            except PackageNotFoundError:
                found = None
        minor = _minor(found) if found else None
        if found is None or minor is None or not low <= minor <= high:
            span = f"{low[0]}.{low[1]}" + (f"-{high[0]}.{high[1]}" if high != low else "")
            out.append(f"{name} {found or 'missing'} (tested {span})")
    return out


def warn_if_untested(stream=None) -> None:
    """One line on stderr (a warning, never a failure) when torch/transformers are untested."""
    off = untested()
    if off:
        print(f"specplug: warning: untested versions: {', '.join(off)}; "
              "`make test-latest` shows what newer releases break", file=stream or sys.stderr)
