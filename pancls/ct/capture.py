"""Route pydicom/nibabel warnings into the inventory row of the file that caused them, not onto stderr.

pydicom warns (``warnings.warn``) about invalid values while converting header elements, nibabel logs to
its ``nibabel.global`` logger. :func:`routed` is entered once, in the main thread, around a whole ingest:
inside it every warning and nibabel log record goes to the *sink* of the thread that raised it, which
:func:`collecting` sets around the work on one file (headers are read in threads, so the sink is
thread-local). A warning raised where no sink is set reaches stderr as before. Each message is one line,
de-duplicated per file.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from typing import Iterator, List, Optional

from pancls.errors import one_line

_local = threading.local()
_LOGGERS = ("nibabel.global", "nibabel")


def _sink() -> Optional[List[str]]:
    return getattr(_local, "sink", None)


def note(sink: List[str], text: str) -> None:
    """Append ``text`` (made one line) to ``sink`` unless it is there already."""
    text = one_line(text)
    if text not in sink:
        sink.append(text)


class _RoutingHandler(logging.Handler):
    def __init__(self, fallback: List[logging.Handler]):
        super().__init__(logging.WARNING)
        self.fallback = fallback

    def emit(self, record: logging.LogRecord) -> None:
        sink = _sink()
        if sink is not None:
            note(sink, f"{record.name}: {record.getMessage()}")
        else:
            for handler in self.fallback:
                handler.handle(record)


@contextlib.contextmanager
def routed() -> Iterator[None]:
    """While active, warnings and nibabel log records go to the current thread's sink (see module doc)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            sink = _sink()
            if sink is not None:
                note(sink, f"{category.__name__}: {message}")
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        saved = []
        for name in _LOGGERS:
            logger = logging.getLogger(name)
            saved.append((logger, list(logger.handlers), logger.propagate))
            handler = _RoutingHandler(list(logger.handlers))
            logger.handlers = [handler]
            logger.propagate = False
        try:
            yield
        finally:
            for logger, handlers, propagate in saved:
                logger.handlers = handlers
                logger.propagate = propagate


@contextlib.contextmanager
def collecting(sink: Optional[List[str]] = None) -> Iterator[List[str]]:
    """Collect the warnings raised in this thread into ``sink`` (a new list by default), which is yielded."""
    sink = [] if sink is None else sink
    previous = _sink()
    _local.sink = sink
    try:
        yield sink
    finally:
        _local.sink = previous
