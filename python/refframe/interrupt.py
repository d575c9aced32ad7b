"""Long native work that Ctrl-C can interrupt at once.

On the CPU, called from the main thread, a computation runs in a worker thread while the main
thread waits in short steps; on an interrupt the native covariance is asked to stop at its next row
block, and the chunked torch covariance at its next chunk (cancel_requested); LAPACK's eigh cannot
be stopped and runs on in the background.
"""

from __future__ import annotations

import atexit
import threading

import torch

from . import _native

_PENDING: dict[threading.Event, dict] = {}  # workers still computing -> their box (holds "key")
_CANCELLED: set[int] = set()  # threads (idents) whose Python-side computation is asked to stop


def cancel_requested() -> bool:
    """Whether the calling thread's computation was interrupted (a long Python loop checks this
    between steps and stops: the chunked covariance raises "covariance: cancelled")."""
    return threading.get_ident() in _CANCELLED


def _cancel(box: dict) -> None:
    _native.cancel_covariance(box.get("key"))  # type: ignore[arg-type]
    if box.get("ident") is not None:
        _CANCELLED.add(box["ident"])  # type: ignore[arg-type]


def compute_running() -> bool:
    """Whether a computation left behind by an interrupt still runs in a worker thread (the command
    line then ends the process without waiting for it)."""
    return any(not done.is_set() for done in list(_PENDING))


@atexit.register
def _finish_workers() -> None:
    """At interpreter exit (a script stopped by Ctrl-C), let abandoned workers finish first: a thread
    still inside torch or LAPACK when the interpreter shuts down would abort the process."""
    for done, box in list(_PENDING.items()):
        _cancel(box)
        done.wait()


def run_interruptible(device: torch.device, fn, *args, cancellable: bool = False, **kwargs):
    """fn(*args, **kwargs); on the CPU, called from the main thread, it runs in a worker thread
    while the main thread waits in short steps, so Ctrl-C (and the CLI's SIGTERM/SIGHUP) interrupt
    the wait at once instead of after a long native call returns. cancellable: fn is a covariance,
    asked on an interrupt to stop at its next row block (native) or chunk (chunked torch path);
    LAPACK's eigh cannot be stopped and runs on in the background. GPU work stays on the calling thread: its current device and
    stream are per thread."""
    if device.type != "cpu" or threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    box: dict[str, object] = {}
    grad = torch.is_grad_enabled()
    done = threading.Event()  # not Thread.is_alive(): an interrupted join() can leave it wrong
    started = threading.Event()

    def work() -> None:
        box["key"] = _native.thread_key()
        box["ident"] = threading.get_ident()
        started.set()
        try:
            with torch.set_grad_enabled(grad):
                box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
        finally:
            _native.clear_cancel(box["key"])
            _CANCELLED.discard(threading.get_ident())
            done.set()
            _PENDING.pop(done, None)

    _PENDING[done] = box
    try:
        threading.Thread(target=work, name="refframe-compute", daemon=True).start()
    except BaseException:
        _PENDING.pop(done, None)
        raise
    try:
        while not done.wait(0.1):
            pass
    except BaseException:
        if cancellable:
            started.wait(1.0)
            _cancel(box)
            done.wait(0.5)  # a cancelled covariance stops within one row block or chunk
        raise
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]
