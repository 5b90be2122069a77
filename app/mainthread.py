"""Model work on the process's main thread, while Gradio serves from its worker threads.

Gradio runs every event handler in a worker thread. On a CPU, PyTorch's OpenMP parallel regions started from a
thread other than the process's first one pay for a new thread team each time (measured on the 2-core machine the
app is developed on: 90 us per small in-place multiply against 22 us on the main thread, and a dense run of the
embedded model took 375 ms instead of 176 ms), so a handler's model work ran about twice as slowly as the same call
from the command line. `python -m app` therefore hands its main thread to a `MainThread` after starting the
server: the handlers' model calls (the functions decorated with `on_main_thread`) are queued to it and the handler
waits for the result. The calls run one at a time, as the two CPU cores would run them anyway; each runs in a
copy of the caller's context variables, so Gradio's progress and request context (and ZeroGPU's, which reads it)
see the request they belong to.

Where no `MainThread` serves (tests, a Gradio app embedded in another program, `app.speed` serving the app in its
own process), a decorated function simply runs in the calling thread, as before.
"""

from __future__ import annotations

import contextvars
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class MainThread:
    """A queue of calls that the main thread runs in `serve`."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._serving = threading.Event()
        self._lock = threading.Lock()  # a call is queued only while serve runs, and drained when it stops

    @property
    def serving(self) -> bool:
        return self._serving.is_set()

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), on the main thread when `serve` runs there (in a copy of this thread's context
        variables), else here. Exceptions travel back to the caller."""
        done: Future = Future()
        with self._lock:
            queued = self.serving and threading.current_thread() is not threading.main_thread()
            if queued:
                self._jobs.put((done, contextvars.copy_context(), fn, args, kwargs))
        return done.result() if queued else fn(*args, **kwargs)

    def serve(self, until: Callable[[], bool] = lambda: False, poll_s: float = 0.2) -> None:
        """Run queued calls on this (the main) thread until `until()` is true or the process is interrupted."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("MainThread.serve must run on the process's main thread")
        self._serving.set()
        try:
            while not until():
                try:
                    done, ctx, fn, args, kwargs = self._jobs.get(timeout=poll_s)
                except queue.Empty:
                    continue
                if not done.set_running_or_notify_cancel():
                    continue
                try:
                    done.set_result(ctx.run(fn, *args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting handler, which reports it
                    done.set_exception(exc)
                    if isinstance(exc, KeyboardInterrupt):
                        raise
        finally:
            with self._lock:
                self._serving.clear()
                self._drain()

    def _drain(self) -> None:
        """Calls queued when serving stopped run in no thread: their callers get an error instead of waiting."""
        while True:
            try:
                done, *_ = self._jobs.get_nowait()
            except queue.Empty:
                return
            if done.set_running_or_notify_cancel():
                done.set_exception(RuntimeError("the app is shutting down"))


MAIN = MainThread()


def on_main_thread(fn: Callable) -> Callable:
    """Decorate a model-work function: it runs on the main thread when `MAIN.serve` runs there."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return MAIN.call(fn, *args, **kwargs)

    return call
