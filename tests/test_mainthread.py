"""The app's model work runs on the process's main thread when `python -m app` serves it there (app/mainthread.py):
PyTorch's CPU parallel regions started from Gradio's worker threads pay for a new thread team each time."""

from __future__ import annotations

import contextvars
import threading

import pytest

from app import handlers
from app.mainthread import MainThread

REQUEST = contextvars.ContextVar("request", default=None)


def serve_while(runner: MainThread, work) -> list:
    """Run `work` in a worker thread while the main thread (the test's) serves the runner; return what it put."""
    out: list = []

    def worker() -> None:
        while not runner.serving:  # serve starts below, after this thread
            threading.Event().wait(0.001)
        try:
            out.append(work())
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            out.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    runner.serve(until=lambda: not t.is_alive(), poll_s=0.01)
    t.join()
    return out


def test_a_call_from_a_worker_thread_runs_on_the_main_thread_in_the_callers_context():
    runner = MainThread()

    def where() -> tuple:
        return threading.current_thread() is threading.main_thread(), REQUEST.get()

    def work():
        REQUEST.set("request 7")  # what Gradio's progress and ZeroGPU read lives in context variables
        return runner.call(where)

    assert threading.current_thread() is threading.main_thread()
    assert serve_while(runner, work) == [(True, "request 7")]


def test_exceptions_travel_back_to_the_caller():
    runner = MainThread()

    def fail():
        raise ValueError("bad picture")

    out = serve_while(runner, lambda: runner.call(fail))
    assert isinstance(out[0], ValueError) and str(out[0]) == "bad picture"


def test_without_a_server_the_call_runs_in_the_calling_thread():
    runner = MainThread()
    out: list = []
    t = threading.Thread(target=lambda: out.append(runner.call(lambda: threading.current_thread().name)))
    t.start()
    t.join()
    assert out == [t.name]


def test_serve_refuses_other_threads():
    runner = MainThread()
    out: list = []

    def worker():
        try:
            runner.serve(until=lambda: True)
        except RuntimeError as exc:
            out.append(str(exc))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert out and "main thread" in out[0]


@pytest.mark.parametrize("name", ["model_runs", "model_runs_beside", "compare_model_runs"])
def test_the_handlers_model_work_goes_through_the_main_thread(monkeypatch, name):
    """Each model-work function of the handlers is dispatched by the app's runner (the one `python -m app`
    serves), here observed by what the model cache sees: which thread asks it for the model."""
    import app.mainthread as mt

    runner = MainThread()
    monkeypatch.setattr(mt, "MAIN", runner)
    seen: list[bool] = []

    class Models:
        def get(self, key):
            seen.append(threading.current_thread() is threading.main_thread())
            raise LookupError("stop here: only the thread is checked")

    monkeypatch.setattr(handlers, "process_models", lambda: Models())
    fn = getattr(handlers, name)
    args = {"model_runs": ("m", None, "q", {}, 4, True), "model_runs_beside": ("m", None, "q", {}, 4, []),
            "compare_model_runs": ("m", None, "q", [], 4)}[name]
    out = serve_while(runner, lambda: fn(*args))
    assert isinstance(out[0], LookupError)
    assert seen == [True]

