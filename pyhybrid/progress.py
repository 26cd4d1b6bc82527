"""Progress of the batch loops of long standalone runs: a bar, and where Ctrl-C stops them (rich; torch-free)."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Context manager yielding ``advance(n)``, to be called after each batch; draws a bar on stderr
    (hidden if not a terminal).

    Ctrl-C (SIGINT) stops the run at the next ``advance``, with KeyboardInterrupt, after the batch
    has been written. Python raises KeyboardInterrupt at whatever code runs when the signal
    arrives; inside a weakref callback or ``__del__`` (Dr.Jit and h5py release objects through
    them) it is printed and ignored, and the run went on. Here the signal only sets a flag while a
    batch runs; a second Ctrl-C raises at once.
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False, disable=not sys.stderr.isatty()) as progress, \
            _interrupt_between_batches() as interrupted:
        task = progress.add_task(description, total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)
            if interrupted():
                raise KeyboardInterrupt

        yield advance


@contextmanager
def _interrupt_between_batches() -> Iterator[Callable[[], bool]]:
    """While active, the first SIGINT is recorded instead of raised; yields ``interrupted()``.
    Only in the main thread (where Python runs signal handlers), where SIGINT is not ignored (a
    background job keeps ignoring it) and where the handler can be restored (not one installed
    outside Python)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield lambda: False
        return
    requested = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        print("\nCtrl-C: stopping after this batch (press again to stop now)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous)
