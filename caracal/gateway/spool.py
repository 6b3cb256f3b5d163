# -*- test-case-name: tests.test_spool,tests.integration.test_audit_trail -*-
"""
The audit spool (SPEC section 14): where audit events wait while Redis
cannot take them, so that an outage loses none.

One append-only file per process under C{AUDIT_SPOOL_DIR}, named
C{audit-<pid>-<random>.spool} and created only when the first event must
wait. Each line is one stream entry's fields as JSON (C{id}, C{data} and
C{_sig} exactly as they would have been sent), so a replayed entry keeps its
id and signature. The process holds an exclusive C{flock} on its file for as
long as the file exists: the lock, not the name, says who owns a spool file.

Replay. L{AuditSpool.replay} (run every L{REPLAY_INTERVAL} seconds) hands
the spooled entries, in the order they were written, one at a time to a
sender (the Redis C{XADD}); the first failure stops it where it is, and the
next round starts again from that entry. Once every entry of the file was
taken, the file is unlinked (still under its lock), so the next outage
starts a new one.

Crashes. A killed process leaves its file behind and the kernel drops its
lock. Every spool (at start and every L{ADOPT_INTERVAL} seconds) looks for
files in the directory that nobody holds a lock on, takes the lock, checks
the file is still linked (its owner may have just finished it) and replays
it like its own before unlinking it. An entry is only unlinked after Redis
acknowledged it, so a crash can repeat entries (consumers dedupe on C{id})
but never lose one that was written. Two live processes never replay the
same file: each holds the lock of the files it works on.

The cap. C{AUDIT_SPOOL_MAX_BYTES} bounds this process's own file; an event
that would take it past the cap is dropped and counted
(C{audit_events_dropped}); serving goes on. The file's bytes reach the
kernel with each event (one C{write} per line) and the disk with an
C{fsync} at most every L{REPLAY_INTERVAL} seconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets

from twisted.internet import defer, task
from twisted.logger import Logger

from caracal.gateway.config import ConfigError

#: Seconds between two replay attempts while something is spooled.
REPLAY_INTERVAL = 0.5

#: Seconds between two looks for files left by processes that died.
ADOPT_INTERVAL = 10.0

SUFFIX = ".spool"

_log = Logger()


def check_spool_directory(directory: str) -> None:
    """
    Make sure this process can create spool files in C{directory}
    (creating it, mode 0700, when missing): an unwritable spool is a
    refused start (SPEC 14), not an outage that loses events later.

    @raise ConfigError: one line naming the directory and the reason.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        probe = os.path.join(directory, f".probe-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\n")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(f"AUDIT_SPOOL_DIR {directory} is not writable: {reason}") from None


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class _SpoolFile:
    """One locked spool file being read from its start (and perhaps appended to)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.reader = open(path, "rb")  # noqa: SIM115 - lives as long as the file
        self.size = os.fstat(fd).st_size
        self.dirty = False

    def finish(self) -> None:
        """Every entry was taken: unlink, then release the lock."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.reader.close()
        os.close(self.fd)


class AuditSpool:
    """
    The spool of one process. See the module docstring.

    @param directory: C{AUDIT_SPOOL_DIR} (checked by L{check_spool_directory}).
    @param max_bytes: C{AUDIT_SPOOL_MAX_BYTES}, the cap on this process's file.
    @param clock: the reactor (C{IReactorTime}).
    @param metrics: counts C{audit_events_dropped}; may be C{None}.
    """

    def __init__(self, directory: str, max_bytes: int, clock, metrics=None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._clock = clock
        self._metrics = metrics
        self._own: _SpoolFile | None = None
        self._adopted: list[_SpoolFile] = []
        self._replaying: defer.Deferred | None = None
        self._loop: task.LoopingCall | None = None
        self._adopt_loop: task.LoopingCall | None = None
        self.dropped = 0

    # -- writing ------------------------------------------------------------

    @property
    def holding(self) -> bool:
        """C{True} while this process's own file has entries not yet replayed."""
        return self._own is not None

    @property
    def size(self) -> int:
        """Bytes in this process's own file (0 when there is none)."""
        return self._own.size if self._own is not None else 0

    def _open_own(self) -> _SpoolFile:
        name = f"audit-{os.getpid()}-{secrets.token_hex(6)}{SUFFIX}"
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _log.warn("audit events are being spooled to {path} until Redis takes them", path=path)
        return _SpoolFile(path, fd)

    def append(self, fields: dict) -> bool:
        """
        Spool one stream entry after the ones already held.

        @return: C{False} when it was dropped (the cap, or the file could
            not be written); it is then counted and logged.
        """
        line = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode("utf-8") + b"\n"
        if self.size + len(line) > self.max_bytes:
            return self._drop(fields, f"the spool is full (AUDIT_SPOOL_MAX_BYTES={self.max_bytes})")
        try:
            if self._own is None:
                self._own = self._open_own()
            written = os.write(self._own.fd, line)
        except OSError as error:
            return self._drop(fields, error.strerror or str(error))
        self._own.size += written
        self._own.dirty = True
        return True

    def _drop(self, fields: dict, reason: str) -> bool:
        self.dropped += 1
        if self._metrics is not None:
            self._metrics.increment("audit_events_dropped")
        _log.error(
            "audit event {event_id} dropped: {reason}", event_id=fields.get("id"), reason=reason
        )
        return False

    # -- replaying ------------------------------------------------------------

    def start(self, send) -> None:
        """
        Replay (own and left-behind files) every L{REPLAY_INTERVAL} seconds
        through C{send(fields) -> Deferred}, which fails when Redis did not
        take the entry.
        """
        self._send = send
        self._loop = task.LoopingCall(self.replay)
        self._loop.clock = self._clock
        self._loop.start(REPLAY_INTERVAL, now=False)
        self._adopt_loop = task.LoopingCall(self.adopt)
        self._adopt_loop.clock = self._clock
        self._adopt_loop.start(ADOPT_INTERVAL, now=True)

    def stop(self) -> defer.Deferred:
        """Stop replaying; the files (and their locks) stay until the process ends."""
        for loop in (self._loop, self._adopt_loop):
            if loop is not None and loop.running:
                loop.stop()
        self._sync()
        waiting = self._replaying
        if waiting is None:
            return defer.succeed(None)
        done = defer.Deferred()
        waiting.addBoth(lambda result: (done.callback(None), result)[1])
        return done

    def adopt(self) -> int:
        """
        Take over spool files no live process holds (left by a crash).

        @return: how many were taken.
        """
        owned = {f.path for f in self._adopted}
        if self._own is not None:
            owned.add(self._own.path)
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as error:
            _log.warn("cannot list AUDIT_SPOOL_DIR: {reason}", reason=error.strerror)
            return 0
        taken = 0
        for name in names:
            path = os.path.join(self.directory, name)
            if not name.endswith(SUFFIX) or path in owned:
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND)
            except OSError:
                continue  # finished and unlinked meanwhile
            if not _try_lock(fd) or os.fstat(fd).st_nlink == 0:
                os.close(fd)
                continue
            _log.info("replaying audit events left in {path}", path=path)
            self._adopted.append(_SpoolFile(path, fd))
            taken += 1
        return taken

    def _sync(self) -> None:
        if self._own is not None and self._own.dirty:
            try:
                os.fsync(self._own.fd)
            except OSError as error:
                _log.warn("fsync of the audit spool failed: {reason}", reason=error.strerror)
            self._own.dirty = False

    def replay(self) -> defer.Deferred:
        """
        One replay round: send what is spooled, in order, until it is all
        sent or a send fails. Fires when the round is over (never errbacks).
        """
        self._sync()
        if self._replaying is not None:
            return self._replaying
        if not self._adopted and self._own is None:
            return defer.succeed(None)
        self._replaying = self._drain()
        self._replaying.addErrback(
            lambda failure: _log.failure("audit spool replay failed", failure)
        )

        def over(result):
            self._replaying = None
            return result

        return self._replaying.addBoth(over)

    @defer.inlineCallbacks
    def _drain(self):
        while self._adopted:
            spool = self._adopted[0]
            if not (yield self._send_file(spool, own=False)):
                return
            self._adopted.pop(0)
            spool.finish()
            _log.info("audit events left in {path} replayed", path=spool.path)
        if self._own is not None:
            if not (yield self._send_file(self._own, own=True)):
                return
            # Read to its end with nothing appended since (this runs in the
            # reactor thread): new events may go to Redis directly again.
            own, self._own = self._own, None
            own.finish()
            _log.info("audit events spooled in {path} replayed to Redis", path=own.path)

    @defer.inlineCallbacks
    def _send_file(self, spool: _SpoolFile, own: bool):
        """Send C{spool}'s entries from where the last round stopped; C{True} at its end."""
        while True:
            start = spool.reader.tell()
            line = spool.reader.readline()
            if not line:
                return True
            if not line.endswith(b"\n"):
                if own:
                    spool.reader.seek(start)
                    return False
                # Torn by a crash mid-write: that event was never spooled whole.
                _log.warn("incomplete last line in {path} skipped", path=spool.path)
                return True
            try:
                fields = json.loads(line)
            except ValueError:
                _log.error("unreadable line in {path} skipped", path=spool.path)
                continue
            try:
                yield self._send(fields)
            except Exception:
                spool.reader.seek(start)
                return False
            if self._clock is not None and self._loop is not None and not self._loop.running:
                # Stopping: leave the rest for the next process.
                return False
