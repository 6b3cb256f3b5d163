# -*- test-case-name: tests.test_logfile -*-
"""
The gateway's log destination for twistd's C{--logger} option::

    twistd --nodaemon --logger caracal.gateway.logfile.observer caracal-gateway

twistd's own C{--logfile} rotates by itself (every megabyte, an unbounded
number of C{.1 .2 ...} files) and renames on SIGUSR1, which fights an
operator's logrotate. This observer instead appends JSON lines (see
L{caracal.gateway.logs.json_log_observer}) to C{CARACAL_LOG_FILE} and only
I{reopens} that path on SIGUSR1, the nginx way: logrotate renames the file,
creates a new one and signals; the gateway then writes to the new file.

Environment:
 - C{CARACAL_LOG_FILE}: the log file's path; unset, empty or C{-} means
   standard output (journald under systemd).
 - C{LOG_LEVEL}: C{debug}, C{info} (default), C{warn} or C{error}.

C{LOG_LEVEL} is applied here only: without C{--logger}, twistd's own
observer (standard output with C{-n}, C{--logfile}, C{--syslog}) writes
events of every level, and twistd has no public hook to filter it. The tap
warns at start when C{LOG_LEVEL} asks for fewer lines than that
(L{caracal.gateway.tap.warn_if_level_ignored}).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
from collections.abc import Mapping

from twisted.logger import ILogObserver, Logger

from caracal.gateway.config import LOG_LEVELS
from caracal.gateway.logs import json_log_observer

LOG_FILE_VARIABLE = "CARACAL_LOG_FILE"
LOG_LEVEL_VARIABLE = "LOG_LEVEL"

# Readable by the service's group (log shippers), never by everyone: access
# lines carry client addresses and request paths.
LOG_FILE_MODE = 0o640

# The signal logrotate sends after creating the new file (nginx's choice too;
# SIGHUP is already the certificate reload).
REOPEN_SIGNAL = signal.SIGUSR1

log = Logger()


def _open_append(path: str, mode: int) -> io.TextIOWrapper:
    """
    Open C{path} for appending, creating it with exactly C{mode} when it is
    missing. An existing file keeps its owner and mode: logrotate's C{create}
    directive (or the operator) decided them.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags | os.O_EXCL, mode)
    except FileExistsError:
        descriptor = os.open(path, flags, mode)
    else:
        try:
            # The umask may have narrowed (or, if zero, kept) other bits;
            # a file this process creates gets exactly the documented mode.
            os.fchmod(descriptor, mode)
        except OSError:
            os.close(descriptor)
            raise
    return open(descriptor, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115


class ReopeningFile:
    """
    A text file appended to at C{path} that can be reopened at the same path
    after an external rotation renamed it away.

    Thread-safe: twisted.logger may emit from threadpool threads while the
    reactor thread reopens.
    """

    def __init__(self, path: str, mode: int = LOG_FILE_MODE) -> None:
        """
        Open (creating if missing) C{path} for appending.

        @param path: the log file; made absolute now because twistd changes
            directory after the logger starts, and a reopen must find the same
            file.
        @param mode: permission bits of a file this process creates.
        @raise OSError: the file cannot be opened.
        """
        self.path = os.path.abspath(path)
        self.mode = mode
        self._lock = threading.Lock()
        self._file = _open_append(self.path, mode)

    def __repr__(self) -> str:
        return f"<ReopeningFile {self.path!r}>"

    def write(self, text: str) -> None:
        """Append C{text} to the currently open file."""
        with self._lock:
            self._file.write(text)

    def flush(self) -> None:
        """Push what was written to the operating system."""
        with self._lock:
            self._file.flush()

    def reopen(self) -> bool:
        """
        Close the current file and open C{path} again (creating it if the
        rotation did not). If C{path} cannot be opened the old file stays in
        use, so no line is lost, and the failure is logged.

        @return: C{True} when the new file is in use.
        """
        try:
            fresh = _open_append(self.path, self.mode)
        except OSError as error:
            log.error(
                "cannot reopen log file {path}: {reason}; still writing to the old file",
                path=self.path,
                reason=error.strerror or str(error),
            )
            return False
        with self._lock:
            stale, self._file = self._file, fresh
            # Flushing the renamed file may fail (disk full?); the new file is
            # already in place, so keep going.
            with contextlib.suppress(OSError):
                stale.close()
        # The first line of the new file says why it starts here; it also lets
        # tooling (and the tests) see the reopen has happened.
        log.info("log file reopened: {path}", path=self.path)
        return True

    def close(self) -> None:
        """Close the file; later writes raise C{ValueError}."""
        with self._lock:
            self._file.close()


def install_reopen_handler(log_file: ReopeningFile, reactor=None, signum: int = REOPEN_SIGNAL):
    """
    Reopen C{log_file} whenever the process receives C{signum} (SIGUSR1).

    The handler only schedules the reopen on the reactor thread
    (C{callFromThread} is safe from a signal handler); the file is swapped
    between two writes, never in the middle of one.

    @param reactor: the reactor to run the reopen on; by default the global
        one, looked up when the signal arrives (twistd installs it first).
    @return: the previous handler, for restoring it.
    """

    def reopen_on_signal(received, frame):
        target = reactor
        if target is None:
            from twisted.internet import reactor as target
        target.callFromThread(log_file.reopen)

    return signal.signal(signum, reopen_on_signal)


def log_level_from(environ: Mapping[str, str]) -> str:
    """
    C{LOG_LEVEL} from C{environ}, lower-cased; C{info} when unset.

    @raise ValueError: not one of C{debug}, C{info}, C{warn}, C{error}.
    """
    level = (environ.get(LOG_LEVEL_VARIABLE) or "").strip().lower() or "info"
    if level not in LOG_LEVELS:
        raise ValueError("LOG_LEVEL must be one of debug, info, warn, error")
    return level


def log_destination(environ: Mapping[str, str]) -> ReopeningFile | None:
    """
    The file named by C{CARACAL_LOG_FILE} in C{environ}, opened; C{None}
    means standard output.

    @raise OSError: the file cannot be opened.
    """
    path = (environ.get(LOG_FILE_VARIABLE) or "").strip()
    if path in ("", "-"):
        return None
    return ReopeningFile(path)


def _refuse(message: str) -> None:
    # Same shape as the tap's startup refusals: one line, exit status 1, no
    # traceback. The logger starts after makeService and before the pidfile
    # is written, so nothing is left behind.
    sys.stderr.write(f"caracal-gateway: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


def observer() -> ILogObserver:
    """
    The log observer factory for twistd's C{--logger}: JSON lines at
    C{LOG_LEVEL} to C{CARACAL_LOG_FILE} (reopened on SIGUSR1) or to standard
    output.

    twistd calls it with no argument, after C{makeService} and before it
    writes the pidfile. A bad C{LOG_LEVEL} or an unopenable file stops the
    start with one line on stderr.
    """
    try:
        level = log_level_from(os.environ)
    except ValueError as error:
        _refuse(str(error))
    try:
        destination = log_destination(os.environ)
    except OSError as error:
        path = os.environ.get(LOG_FILE_VARIABLE, "")
        _refuse(f"{LOG_FILE_VARIABLE} {path}: {error.strerror or error}")
    if destination is None:
        return json_log_observer(sys.stdout, level)
    install_reopen_handler(destination)
    return json_log_observer(destination, level)
