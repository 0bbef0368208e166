"""Argument checks shared by the whole library, in one place (after scikit-learn's ``utils.validation``).

Every constructor and function that takes a user-settable number, choice or class-count list checks it with a
helper from here, so the rule and its message are written once::

    >>> check_scalar(0.5, "flip_prob", float, min_val=0, max_val=1)
    0.5
    >>> check_scalar(0, "scale_init", float, min_val=0, include_boundaries="neither")
    Traceback (most recent call last):
    ...
    pancls.validation.InvalidParameter: scale_init: must be a finite number > 0, got 0

A failed check raises :class:`InvalidParameter`, which is both a :class:`~pancls.errors.UserError` (the CLI prints
it on one line and exits 2) and a :class:`ValueError` (what a Python caller of a library function expects). Its
``where`` is the argument's name; the config boundary that knows the YAML key puts the section in front of it
(:meth:`InvalidParameter.within`: ``scale_init`` -> ``model.head_kwargs.scale_init``).

The bounds logic of :func:`check_scalar` is scikit-learn's ``check_scalar``; this module adds what a config needs
on top: booleans are not numbers (YAML reads ``yes`` as ``True``), NaN and infinities are refused, and the message
names the argument and the value in the project's one-line format.
"""
from __future__ import annotations

import difflib
import math
import numbers
import operator
from typing import Any, Collection, Iterable, List, Optional, Sequence

from sklearn.utils import check_scalar as _sklearn_check_scalar

from pancls.errors import UserError

__all__ = ["InvalidParameter", "check_scalar", "check_choice", "check_class_counts", "suggest"]


class InvalidParameter(UserError, ValueError):
    """A bad value for the argument (or config key) ``where``."""

    def within(self, prefix: str, keys: Optional[Iterable[str]] = None) -> "InvalidParameter":
        """The same problem named inside section ``prefix`` (``prefix.where``).

        With ``keys`` (the options the section's caller actually passed) an argument outside them is returned
        unchanged: a check on a value the library computed is not the user's key.
        """
        head = str(self.where).split(".", 1)[0]
        if keys is not None and head not in set(keys):
            return self
        return InvalidParameter(self.reason, f"{prefix}.{self.where}")


def suggest(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` (difflib, as MONAI's ``look_up_option``), or ""."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _bounds(min_val, max_val, include_boundaries: str) -> str:
    low = include_boundaries in ("left", "both")
    high = include_boundaries in ("right", "both")
    if min_val is not None and max_val is not None:
        return f" in {'[' if low else '('}{min_val:g}, {max_val:g}{']' if high else ')'}"
    if min_val is not None:
        return f" {'>=' if low else '>'} {min_val:g}"
    if max_val is not None:
        return f" {'<=' if high else '<'} {max_val:g}"
    return ""


def check_scalar(x: Any, name: str, target_type: type | tuple = numbers.Real, *, min_val: Optional[float] = None,
                 max_val: Optional[float] = None, include_boundaries: str = "both") -> Any:
    """Check that ``x`` is a finite scalar of ``target_type`` within the bounds; return it unchanged.

    ``target_type`` is ``int`` (any integral number: Python, NumPy or a 0-d integer tensor via
    :func:`operator.index`) or ``float`` / :class:`numbers.Real` (any real number; integers included).
    ``include_boundaries`` is ``"both"``, ``"left"``, ``"right"`` or ``"neither"``, as in scikit-learn. A boolean
    is never accepted as a number.

    Raises
    ------
    InvalidParameter
        ``name: must be a finite number > 0, got 0`` and the like.
    """
    integer = target_type is int or target_type is numbers.Integral
    kind = "an integer" if integer else "a finite number"
    bad = InvalidParameter(f"must be {kind}{_bounds(min_val, max_val, include_boundaries)}, got {x!r}", name)
    if isinstance(x, bool):
        raise bad
    if integer:
        try:
            x = operator.index(x)
        except TypeError:
            raise bad from None
    elif not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise bad
    try:
        _sklearn_check_scalar(x, name, numbers.Integral if integer else numbers.Real, min_val=min_val,
                              max_val=max_val, include_boundaries=include_boundaries)
    except (TypeError, ValueError):
        raise bad from None
    return x


def check_choice(value: Any, name: Optional[str], choices: Collection[str], what: Optional[str] = None) -> str:
    """``value`` if it is one of ``choices``, else :class:`InvalidParameter` listing them with a suggestion.

    ``what`` names the kind of value in the message (``unknown head 'tps'``); default: the last part of ``name``.
    """
    if value in choices:
        return value
    ordered: List[str] = list(choices)
    what = what or str(name).rsplit(".", 1)[-1].replace("_", " ")
    raise InvalidParameter(f"unknown {what} {value!r}{suggest(str(value), ordered)}; choose one of: "
                           f"{', '.join(map(str, ordered))}", name)


def check_class_counts(class_counts: Any, name: str = "class_counts", min_classes: int = 2) -> List[int]:
    """``class_counts`` as a list of Python ints: at least ``min_classes`` entries, each >= 1.

    Accepts Python, NumPy and 0-d integer tensor counts; refuses ``2.5``, ``"3"``, booleans and strings.
    """
    if isinstance(class_counts, (str, bytes)):
        raise InvalidParameter(f"must be a sequence of integers, got {class_counts!r}", name)
    try:
        counts = [operator.index(n) for n in class_counts if not isinstance(n, bool)]
    except TypeError:
        raise InvalidParameter(f"must be a sequence of integers, got {class_counts!r}", name) from None
    if len(counts) != len(class_counts):
        raise InvalidParameter(f"must be a sequence of integers, got {class_counts!r}", name)
    if len(counts) < min_classes:
        raise InvalidParameter(f"needs at least {min_classes} classes, got {len(counts)}", name)
    empty = [k for k, n in enumerate(counts) if n <= 0]
    if empty:
        raise InvalidParameter(f"class(es) {empty} have no training samples; every class needs at least one", name)
    return counts
