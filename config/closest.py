"""The known names closest to one that matched nothing: podcasts, episode ids, setting names.

Every command that selects by a name says which name matched nothing and suggests these,
so a typo, a name in the wrong case or an id without its suffix (`E140` for `E140.mp3`)
is never a silent empty result.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Iterable

# How many names a suggestion offers, and how alike (difflib's ratio) a name must be to be offered.
SUGGESTIONS = 3
CUTOFF = 0.6


def closest_names(name: str, known: Iterable[str | None], n: int = SUGGESTIONS) -> list[str]:
    """Up to `n` of the `known` names closest to `name`, best first, ignoring case and Unicode form.

    A known name that begins with `name` comes first whatever its length (difflib's ratio
    falls as the rest grows, and `E140` is what one types for `E140.mp3`).
    """
    by_fold: dict[str, str] = {}
    for candidate in known:
        if candidate is not None:
            by_fold.setdefault(_fold(candidate), candidate)
    wanted = _fold(name)
    if not wanted:
        return []
    prefixed = sorted((f for f in by_fold if f.startswith(wanted) and f != wanted), key=len)
    similar = difflib.get_close_matches(wanted, list(by_fold), n=n, cutoff=CUTOFF)
    ordered = [f for f in [wanted, *prefixed, *similar] if f in by_fold]
    return [by_fold[f] for f in dict.fromkeys(ordered)][:n]


def no_such(what: str, name: str, known: Iterable[str | None], where: str) -> str:
    """One line for a name that matched nothing: `no podcast 'X' in WHERE (closest: 'Y', 'Z')`."""
    known = [k for k in known if k is not None]
    close = closest_names(name, known)
    hint = f"closest: {', '.join(map(repr, close))}" if close else "none is close" if known else "there are none"
    return f"no {what} {name!r} {where} ({hint})"


def _fold(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold().strip()
