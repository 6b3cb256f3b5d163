"""
Private server processes for outage tests (L{tests.support.postgres},
L{tests.support.redis}, L{tests.support.sentinel}): waiting until one
answers, and stopping it. They run before and after the reactor's part of a
test, so these block (briefly) rather than return Deferreds.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

#: Seconds between two attempts to reach a server that is starting.
START_POLL_INTERVAL = 0.02


def wait_for_server(
    process: subprocess.Popen,
    answers: Callable[[], bool],
    deadline: float,
    failure: str,
    not_yet: tuple[type[BaseException], ...] = (),
    interval: float = START_POLL_INTERVAL,
) -> float:
    """
    Call C{answers()} until it is true, C{interval} seconds apart; an
    exception of C{not_yet} counts as false.

    @return: the C{time.monotonic()} at which the server first answered.
    @raise RuntimeError: with C{failure}, once C{process} exited or
        C{deadline} seconds passed (the process is stopped first).
    """
    give_up = time.monotonic() + deadline
    while True:
        try:
            if answers():
                return time.monotonic()
        except not_yet:
            pass
        if process.poll() is not None or time.monotonic() > give_up:
            stop_server(process)
            raise RuntimeError(failure)
        time.sleep(interval)


def stop_server(
    process: subprocess.Popen | None, stop_signal: int = signal.SIGTERM, timeout: float = 5.0
) -> None:
    """
    Send C{stop_signal} to C{process} and wait up to C{timeout} seconds for
    it to exit, then kill it; nothing when it is not running.
    """
    if process is None or process.poll() is not None:
        return
    process.send_signal(stop_signal)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
