"""Long native work that Ctrl-C can interrupt at once.

On the CPU, called from the main thread, a computation runs in a worker thread while the main
thread waits in short steps; on an interrupt the native covariance is asked to stop at its next row
block (LAPACK's eigh cannot be stopped and runs on in the background).
"""

from __future__ import annotations

import atexit
import threading

import torch

from . import _native

_PENDING: dict[threading.Event, dict] = {}  # workers still computing -> their box (holds "key")


def compute_running() -> bool:
    """Whether a computation left behind by an interrupt still runs in a worker thread (the command
    line then ends the process without waiting for it)."""
    return any(not done.is_set() for done in list(_PENDING))


@atexit.register
def _finish_workers() -> None:
    """At interpreter exit (a script stopped by Ctrl-C), let abandoned workers finish first: a thread
    still inside torch or LAPACK when the interpreter shuts down would abort the process."""
    for done, box in list(_PENDING.items()):
        _native.cancel_covariance(box.get("key"))
        done.wait()


def run_interruptible(device: torch.device, fn, *args, cancellable: bool = False, **kwargs):
    """fn(*args, **kwargs); on the CPU, called from the main thread, it runs in a worker thread
    while the main thread waits in short steps, so Ctrl-C (and the CLI's SIGTERM/SIGHUP) interrupt
    the wait at once instead of after a long native call returns. cancellable: fn is the native
    covariance, asked on an interrupt to stop at its next row block (LAPACK's eigh cannot be stopped
    and runs on in the background). GPU work stays on the calling thread: its current device and
    stream are per thread."""
    if device.type != "cpu" or threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    box: dict[str, object] = {}
    grad = torch.is_grad_enabled()
    done = threading.Event()  # not Thread.is_alive(): an interrupted join() can leave it wrong
    started = threading.Event()

    def work() -> None:
        box["key"] = _native.thread_key()
        started.set()
        try:
            with torch.set_grad_enabled(grad):
                box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
        finally:
            _native.clear_cancel(box["key"])
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
            _native.cancel_covariance(box.get("key"))  # type: ignore[arg-type]
            done.wait(0.5)  # a cancelled covariance stops within one row block
        raise
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]
