# -*- test-case-name: tests.test_logfile -*-
"""
Tests for L{caracal.gateway.logfile}: the reopen-on-SIGUSR1 log file and the
twistd C{--logger} factory reading C{CARACAL_LOG_FILE} and C{LOG_LEVEL}.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import sys

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway import logfile
from caracal.gateway.logfile import (
    LOG_FILE_MODE,
    ReopeningFile,
    install_reopen_handler,
    log_destination,
    log_level_from,
)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _event(level: LogLevel, text: str) -> dict:
    return {
        "log_level": level,
        "log_namespace": "caracal.test",
        "log_format": "{text}",
        "text": text,
        "log_time": 1700000000.0,
    }


class _CallFromThreadRecorder:
    """Stands in for the reactor: records what a signal handler schedules."""

    def __init__(self) -> None:
        self.calls = []

    def callFromThread(self, f, *args, **kwargs):
        self.calls.append((f, args, kwargs))


class ReopeningFileTests(SynchronousTestCase):
    """L{ReopeningFile} appends, survives a rename, and reopens."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "gateway.log")
        # Reopen announces itself through twisted.logger; keep the record.
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def open(self) -> ReopeningFile:
        log_file = ReopeningFile(self.path)
        self.addCleanup(log_file.close)
        return log_file

    def test_creates_with_mode_0640(self) -> None:
        """A missing file is created 0640 whatever the umask."""
        for umask in (0o000, 0o077):
            previous = os.umask(umask)
            try:
                path = os.path.join(self.directory, f"umask-{umask:o}.log")
                ReopeningFile(path).close()
            finally:
                os.umask(previous)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        self.assertEqual(LOG_FILE_MODE, 0o640)

    def test_existing_file_appended_mode_kept(self) -> None:
        """An existing file is appended to; its mode (logrotate's choice) is kept."""
        with open(self.path, "w", encoding="utf-8") as f:
            f.write("earlier\n")
        os.chmod(self.path, 0o600)
        log_file = self.open()
        log_file.write("later\n")
        log_file.flush()
        self.assertEqual(_read(self.path), "earlier\nlater\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_path_made_absolute(self) -> None:
        """
        A relative path is resolved at open time: twistd changes directory
        later and a reopen must land on the same file.
        """
        relative = os.path.relpath(self.path)
        log_file = ReopeningFile(relative)
        self.addCleanup(log_file.close)
        self.assertEqual(log_file.path, os.path.abspath(self.path))

    def test_write_without_reopen_follows_rename(self) -> None:
        """
        Until reopened, lines keep going to the renamed file: the state between
        logrotate's rename and its signal loses nothing.
        """
        log_file = self.open()
        log_file.write("one\n")
        log_file.flush()
        os.rename(self.path, self.path + ".1")
        log_file.write("two\n")
        log_file.flush()
        self.assertEqual(_read(self.path + ".1"), "one\ntwo\n")
        self.assertFalse(os.path.exists(self.path))

    def test_reopen_after_rename(self) -> None:
        """After a rename, reopen writes new lines to a new file at the path."""
        log_file = self.open()
        log_file.write("before\n")
        log_file.flush()
        os.rename(self.path, self.path + ".1")
        self.assertTrue(log_file.reopen())
        log_file.write("after\n")
        log_file.flush()
        self.assertEqual(_read(self.path + ".1"), "before\n")
        self.assertEqual(_read(self.path), "after\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        reopened = [e for e in self.events if e.get("log_format", "").startswith("log file reop")]
        self.assertEqual(len(reopened), 1)
        self.assertEqual(reopened[0]["path"], self.path)

    def test_reopen_uses_file_created_by_rotation(self) -> None:
        """logrotate's C{create} made the new file: reopen appends to it as is."""
        log_file = self.open()
        os.rename(self.path, self.path + ".1")
        with open(self.path, "w", encoding="utf-8") as f:
            f.write("created by logrotate\n")
        os.chmod(self.path, 0o644)
        self.assertTrue(log_file.reopen())
        log_file.write("after\n")
        log_file.flush()
        self.assertEqual(_read(self.path), "created by logrotate\nafter\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o644)

    def test_reopen_failure_keeps_old_file(self) -> None:
        """When the path cannot be opened, lines keep going to the old file."""
        log_file = self.open()
        os.rename(self.path, self.path + ".1")
        # A directory where the file should be: the open fails.
        os.mkdir(self.path)
        self.assertFalse(log_file.reopen())
        log_file.write("still here\n")
        log_file.flush()
        self.assertEqual(_read(self.path + ".1"), "still here\n")
        errors = [e for e in self.events if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["path"], self.path)

    def test_write_after_close_raises(self) -> None:
        """A closed file refuses writes instead of silently dropping them."""
        log_file = ReopeningFile(self.path)
        log_file.close()
        self.assertRaises(ValueError, log_file.write, "late\n")

    def test_signal_handler_schedules_reopen_on_reactor(self) -> None:
        """
        SIGUSR1 does not reopen inside the signal handler: it schedules
        C{reopen} on the reactor thread.
        """
        log_file = self.open()
        recorder = _CallFromThreadRecorder()
        previous = install_reopen_handler(log_file, reactor=recorder)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        handler = signal.getsignal(signal.SIGUSR1)
        handler(signal.SIGUSR1, None)
        self.assertEqual(recorder.calls, [(log_file.reopen, (), {})])


class EnvironmentTests(SynchronousTestCase):
    """C{LOG_LEVEL} and C{CARACAL_LOG_FILE} parsing."""

    def test_level_default_info(self) -> None:
        """LOG_LEVEL unset or blank means info."""
        self.assertEqual(log_level_from({}), "info")
        self.assertEqual(log_level_from({"LOG_LEVEL": " "}), "info")

    def test_level_case_insensitive(self) -> None:
        """LOG_LEVEL is read without regard to case."""
        self.assertEqual(log_level_from({"LOG_LEVEL": "WARN"}), "warn")
        self.assertEqual(log_level_from({"LOG_LEVEL": "debug"}), "debug")

    def test_level_unknown_refused(self) -> None:
        """An unknown LOG_LEVEL is refused with the list of levels."""
        error = self.assertRaises(ValueError, log_level_from, {"LOG_LEVEL": "verbose"})
        self.assertEqual(str(error), "LOG_LEVEL must be one of debug, info, warn, error")

    def test_destination_stdout(self) -> None:
        """Unset, empty and C{-} all mean standard output."""
        for environ in ({}, {"CARACAL_LOG_FILE": ""}, {"CARACAL_LOG_FILE": "-"}):
            self.assertIsNone(log_destination(environ))

    def test_destination_file(self) -> None:
        """CARACAL_LOG_FILE names a reopenable log file, created at once."""
        path = os.path.abspath(self.mktemp())
        destination = log_destination({"CARACAL_LOG_FILE": path})
        self.addCleanup(destination.close)
        self.assertIsInstance(destination, ReopeningFile)
        self.assertEqual(destination.path, path)
        self.assertTrue(os.path.exists(path))


class ObserverFactoryTests(SynchronousTestCase):
    """L{logfile.observer}, as twistd's C{--logger} calls it."""

    def setUp(self) -> None:
        self.environ = {
            k: v for k, v in os.environ.items() if k not in ("CARACAL_LOG_FILE", "LOG_LEVEL")
        }
        self.patch(os, "environ", self.environ)
        # The factory installs a SIGUSR1 handler; put the old one back.
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def test_file_and_level(self) -> None:
        """
        JSON lines at C{LOG_LEVEL} and above go to C{CARACAL_LOG_FILE}, created
        0640; lower levels are dropped.
        """
        path = os.path.abspath(self.mktemp())
        self.environ["CARACAL_LOG_FILE"] = path
        self.environ["LOG_LEVEL"] = "warn"
        observe = logfile.observer()
        observe(_event(LogLevel.info, "quiet"))
        observe(_event(LogLevel.warn, "loud"))
        observe(_event(LogLevel.error, "louder"))
        lines = [json.loads(line) for line in _read(path).splitlines()]
        self.assertEqual([line["msg"] for line in lines], ["loud", "louder"])
        self.assertEqual([line["level"] for line in lines], ["warn", "error"])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)

    def test_sigusr1_reopens_file(self) -> None:
        """
        With a file, the factory installs the SIGUSR1 handler: after a rename
        and the scheduled reopen, lines go to the new file.
        """
        path = os.path.abspath(self.mktemp())
        self.environ["CARACAL_LOG_FILE"] = path
        observe = logfile.observer()
        observe(_event(LogLevel.info, "first"))
        handler = signal.getsignal(signal.SIGUSR1)
        self.assertTrue(callable(handler))
        os.rename(path, path + ".1")
        # What the handler schedules is reopen of this very file; run the
        # reopen the way the reactor would.
        recorder = _CallFromThreadRecorder()
        from twisted.internet import reactor

        self.patch(reactor, "callFromThread", recorder.callFromThread)
        handler(signal.SIGUSR1, None)
        self.assertEqual(len(recorder.calls), 1)
        reopen, args, kwargs = recorder.calls[0]
        self.assertTrue(reopen())
        observe(_event(LogLevel.info, "second"))
        self.assertEqual(
            [json.loads(line)["msg"] for line in _read(path + ".1").splitlines()], ["first"]
        )
        self.assertEqual([json.loads(line)["msg"] for line in _read(path).splitlines()], ["second"])

    def test_stdout_by_default(self) -> None:
        """Without C{CARACAL_LOG_FILE}, JSON lines go to standard output; no handler."""
        before = signal.getsignal(signal.SIGUSR1)
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        observe = logfile.observer()
        observe(_event(LogLevel.debug, "hidden"))
        observe(_event(LogLevel.info, "shown"))
        lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
        self.assertEqual([line["msg"] for line in lines], ["shown"])
        self.assertIs(signal.getsignal(signal.SIGUSR1), before)

    def test_debug_level(self) -> None:
        """C{LOG_LEVEL=debug} lets debug lines through."""
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.environ["LOG_LEVEL"] = "DEBUG"
        observe = logfile.observer()
        observe(_event(LogLevel.debug, "detail"))
        self.assertEqual(json.loads(stdout.getvalue())["msg"], "detail")

    def test_bad_level_refuses_start(self) -> None:
        """A bad C{LOG_LEVEL}: one line on stderr, exit status 1, no traceback."""
        self.environ["LOG_LEVEL"] = "chatty"
        error = self.assertRaises(SystemExit, logfile.observer)
        self.assertEqual(error.code, 1)
        self.assertEqual(
            self.stderr.getvalue(),
            "caracal-gateway: LOG_LEVEL must be one of debug, info, warn, error\n",
        )

    def test_unopenable_file_refuses_start(self) -> None:
        """A log path in a missing directory refuses the start, naming the path."""
        path = os.path.join(os.path.abspath(self.mktemp()), "missing", "gateway.log")
        self.environ["CARACAL_LOG_FILE"] = path
        error = self.assertRaises(SystemExit, logfile.observer)
        self.assertEqual(error.code, 1)
        self.assertEqual(
            self.stderr.getvalue(),
            f"caracal-gateway: CARACAL_LOG_FILE {path}: No such file or directory\n",
        )
