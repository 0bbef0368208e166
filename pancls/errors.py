"""The one exception type for a user's mistakes.

Anything raised as :class:`UserError` is a problem with the input (a file, an argument, a config
value): the CLI prints its message on one line and exits with status 2. Every other exception is a
bug in pancls and keeps its traceback.
"""
from __future__ import annotations

import os
import re
from typing import Iterable


def one_line(text: object, escape: bool = False) -> str:
    """``text`` as a single line: line breaks become `` / ``, other control characters their escapes.

    With ``escape`` (for names: a file name may hold a newline) every control character, line breaks
    included, becomes its escape (``\\n``), so that the name stays recognisable. Decoder messages
    (OpenJPEG, pydicom's plugin list), printed matrices and such names would otherwise split one problem
    over several lines of a terminal, a log or a CSV cell.
    """
    if escape:
        return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
    lines = [line.strip() for line in str(text).replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    joined = " / ".join(line for line in lines if line)
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in joined)


def exception_text(exc: BaseException, *paths: str | os.PathLike) -> str:
    """``"<Type>: <first line of its message>"`` (the type alone for an empty message), for a reason built from a
    library's exception. Each of ``paths`` (as given and resolved) becomes ``<file>`` in it: readers such as
    nibabel repeat the path in their messages, and a reason can reach output files (``pancls predict``'s error
    column, ingest's inventory) where an input path, which may name the patient, must not; the
    :class:`UserError` carrying the reason names the file in its ``where`` for the terminal."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    spelled = {os.fspath(p) for p in paths} | {os.path.abspath(os.fspath(p)) for p in paths}
    for name in sorted((n for n in spelled if n), key=len, reverse=True):
        text = text.replace(name, "<file>")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class UserError(Exception):
    """A problem with the user's input, reported as one line: ``<where>: <reason>``.

    Parameters
    ----------
    reason : str
        What is wrong, in words a user can act on. Made one line (:func:`one_line`) unless the class sets
        ``multiline`` (a report listing many problems, one per line).
    where : str or os.PathLike, optional
        The file, argument or config key the problem is in (always made one line).
    """

    multiline = False

    def __init__(self, reason: str, where: str | os.PathLike | None = None):
        self.reason = str(reason) if self.multiline else one_line(reason)
        self.where = None if where is None else one_line(os.fspath(where), escape=True)
        super().__init__(f"{self.where}: {self.reason}" if self.where else self.reason)


def redact_names(text: str, names: Iterable[str], placeholder: str = "<file>") -> str:
    """``text`` with each of ``names`` (the file and folder names and zip member paths of an input) replaced by
    ``placeholder`` where it stands as a whole name, not inside a longer name or a number. For reasons that reach
    output files (``pancls predict``'s error column): DICOM files are often named by their SOP Instance UID and
    folders after the patient, and a reader's or pancls' own message may name the file; the terminal keeps them.
    Names under 4 characters (``I10``, ``1``) carry no UID or name and would match numbers: they are left."""
    for name in sorted({str(n) for n in names if len(str(n)) >= 4}, key=len, reverse=True):
        if name in text:
            text = re.sub(rf"(?<![\w.\-]){re.escape(name)}(?![\w\-]|\.\w)", placeholder, text)
    return text
