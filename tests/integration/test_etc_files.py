# -*- test-case-name: tests.integration.test_etc_files -*-
"""
The operations files under C{etc/} checked against the code they drive:

 - C{caracal-gateway.env.example} names every SPEC section 2 variable and,
   once its placeholders are filled, is a configuration
   L{GatewayConfig.from_environ} accepts in production;
 - C{caracal-gateway.service} carries the hardening directives, passes
   C{systemd-analyze verify}, and its command line is one twistd accepts;
 - C{logrotate.d/caracal-gateway}, run by the real logrotate against a real
   process logging through L{caracal.gateway.logfile}: old lines stay in the
   rotated file, new lines go to the new one, nothing is lost.
"""

from __future__ import annotations

import fnmatch
import grp
import gzip
import json
import os
import pwd
import re
import select
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time

from twisted.python.reflect import namedAny
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from caracal.gateway.config import ConfigError, GatewayConfig
from caracal.gateway.logfile import log_level_from
from caracal.gateway.tls import load_server_certificate
from tests.support.certs import make_chain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ETC = os.path.join(ROOT, "etc")
ENV_EXAMPLE = os.path.join(ETC, "caracal-gateway.env.example")
UNIT = os.path.join(ETC, "caracal-gateway.service")
LOGROTATE = os.path.join(ETC, "logrotate.d", "caracal-gateway")

# SPEC section 2, in table order.
SPEC_VARIABLES = (
    "CARACAL_ENV",
    "PORT",
    "BIND_ADDRESS",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "INSECURE_HTTP",
    "INSECURE_STS",
    "STS_URL",
    "STS_CA_FILE",
    "UPSTREAM_CA_FILE",
    "DATABASE_URL",
    "REDIS_URL",
    "JTI_FAIL_OPEN",
    # SPEC 16: replica-acknowledged JTI claims (README "Running a fleet").
    "REPLAY_MIN_REPLICAS",
    # SPEC section 12
    "REVOCATION_FAIL_OPEN",
    "STREAMS_HMAC_KEY",
    "ALLOW_PRIVATE_UPSTREAMS",
    "UPSTREAM_HOST_ALLOWLIST",
    "MAX_REQUEST_BYTES",
    "STS_TIMEOUT",
    "UPSTREAM_TIMEOUT",
    "READ_HEADER_TIMEOUT",
    "READ_TIMEOUT",
    "WRITE_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_TOKEN_LIFETIME",
    "MAX_CONNECTIONS",
    "LOG_LEVEL",
    # SPEC 13.
    "STREAM_IDLE_TIMEOUT",
    "SSE_KEEPALIVE",
    "PUBLIC_URL",
    "AUTHORIZATION_SERVERS",
    "CORS_ALLOWED_ORIGINS",
    # SPEC section 12.
    "METRICS_BEARER",
    "METRICS_ADDRESS",
    # Sections 12 (H9) and 14.
    "AUDIT_STREAM_MAXLEN",
    "AUDIT_SPOOL_DIR",
    "AUDIT_SPOOL_MAX_BYTES",
)

_ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")
_COMMENTED_ASSIGNMENT = re.compile(r"^#\s*([A-Z_][A-Z0-9_]*)=")
_PLACEHOLDER = re.compile(r"<[^<>]+>")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def parse_env_file(text: str) -> tuple[dict[str, str], set[str]]:
    """
    Read an EnvironmentFile the way systemd does for the subset the example
    uses: C{(set variables, variables shown only commented out)}.

    @raise ValueError: a line systemd would read differently than it looks
        (C{export}, quotes, a comment after a value, a duplicate).
    """
    active: dict[str, str] = {}
    commented: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(("#", ";")):
            match = _COMMENTED_ASSIGNMENT.match(stripped)
            if match:
                commented.add(match.group(1))
            continue
        match = _ASSIGNMENT.match(stripped)
        if match is None:
            raise ValueError(f"line {number}: not NAME=value: {line!r}")
        name, value = match.groups()
        if " #" in value or value[:1] in ("'", '"'):
            raise ValueError(f"line {number}: quotes or comment in the value of {name}")
        if name in active:
            raise ValueError(f"line {number}: {name} set twice")
        active[name] = value
    return active, commented


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as C{{section: [(key, value), ...]}} (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], [])
            continue
        key, _, value = stripped.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def _twistd() -> str | None:
    """The twistd next to this interpreter (the venv's), or on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("twistd")


class EnvExampleTests(SynchronousTestCase):
    """C{etc/caracal-gateway.env.example} is a complete, valid production configuration."""

    def setUp(self) -> None:
        self.text = _read(ENV_EXAMPLE)
        self.active, self.commented = parse_env_file(self.text)

    def test_spec_list_matches_config(self) -> None:
        """The SPEC's variables are exactly those the configuration reads."""
        self.assertEqual(set(SPEC_VARIABLES), set(GatewayConfig().redacted()))

    def test_every_spec_variable_documented(self) -> None:
        """Every SPEC variable is set or shown commented out, plus CARACAL_LOG_FILE."""
        documented = set(self.active) | self.commented
        missing = [name for name in (*SPEC_VARIABLES, "CARACAL_LOG_FILE") if name not in documented]
        self.assertEqual(missing, [])
        unknown = set(self.active) - set(SPEC_VARIABLES) - {"CARACAL_LOG_FILE"}
        self.assertEqual(unknown, set())

    def test_every_variable_annotated(self) -> None:
        """Each variable is preceded by a comment saying what it is."""
        lines = self.text.splitlines()
        for index, line in enumerate(lines):
            match = _ASSIGNMENT.match(line) or _COMMENTED_ASSIGNMENT.match(line)
            if match is None or match.group(1) in ("TLS_KEY_FILE",):
                continue
            if match.group(1) in ("READ_TIMEOUT", "WRITE_TIMEOUT", "IDLE_TIMEOUT"):
                continue  # documented together with READ_HEADER_TIMEOUT
            above = lines[index - 1].strip() if index else ""
            self.assertTrue(
                above.startswith("#") and above != "#",
                f"{match.group(1)} has no comment above it",
            )

    def test_production_safe_values(self) -> None:
        """Production mode, no escape hatch, the production port, TLS files set."""
        self.assertEqual(self.active["CARACAL_ENV"], "production")
        self.assertEqual(self.active["PORT"], "8081")
        for hatch in (
            "INSECURE_HTTP",
            "INSECURE_STS",
            "JTI_FAIL_OPEN",
            "REVOCATION_FAIL_OPEN",
            "ALLOW_PRIVATE_UPSTREAMS",
        ):
            self.assertEqual(self.active[hatch], "false", hatch)
        self.assertTrue(self.active["STS_URL"].startswith("https://"))
        self.assertTrue(self.active["REDIS_URL"].startswith("rediss://"))
        self.assertIn("sslmode=verify-full", self.active["DATABASE_URL"])
        self.assertTrue(self.active["TLS_CERT_FILE"].startswith("/etc/caracal/"))
        self.assertTrue(self.active["TLS_KEY_FILE"].startswith("/etc/caracal/"))

    def test_no_secret_committed(self) -> None:
        """Secrets are placeholders, never values."""
        self.assertRegex(self.active["STREAMS_HMAC_KEY"], r"^<[^<>]+>$")
        self.assertRegex(self.active["DATABASE_URL"], r"://[^:]+:<[^<>]+>@")
        self.assertRegex(self.active["REDIS_URL"], r"://:<[^<>]+>@")

    def test_placeholder_key_refused(self) -> None:
        """
        Installed as is, the example does not start: a forgotten HMAC key
        placeholder is a startup error, not a weak key.
        """
        error = self.assertRaises(ConfigError, GatewayConfig.from_environ, self.active)
        self.assertEqual(str(error), "STREAMS_HMAC_KEY must be hex-encoded and at least 32 bytes")

    def test_filled_example_is_valid_production_configuration(self) -> None:
        """
        With the placeholders filled and real certificate files, the example
        is accepted by the configuration and the TLS loader, in production.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        _, leaf = make_chain(directory)
        cert_file, key_file = leaf.write(directory, stem="example")
        hmac_key = os.urandom(32).hex()
        fills = {
            "<64 hex chars: openssl rand -hex 32>": hmac_key,
            "<sts host>": "sts.caracal.test",
            "<database password>": "pg-password",
            "<postgres host>": "postgres.caracal.test",
            "<redis password>": "redis-password",
            "<redis host>": "redis.caracal.test",
        }
        environ = {}
        for name, value in self.active.items():
            for placeholder in _PLACEHOLDER.findall(value):
                self.assertIn(placeholder, fills, f"{name}: no test value for {placeholder}")
                value = value.replace(placeholder, fills[placeholder])
            environ[name] = value
        environ["TLS_CERT_FILE"] = cert_file
        environ["TLS_KEY_FILE"] = key_file

        config = GatewayConfig.from_environ(environ)

        self.assertTrue(config.production)
        self.assertEqual(config.port, 8081)
        self.assertTrue(config.tls_enabled)
        self.assertFalse(config.escape_hatches())
        self.assertEqual(config.streams_hmac_key, bytes.fromhex(hmac_key))
        self.assertEqual(config.sts_base_url, "https://sts.caracal.test")
        self.assertEqual(config.redis.host, "redis.caracal.test")
        self.assertTrue(config.redis.tls)
        self.assertEqual(config.redis.password, "redis-password")
        self.assertEqual(config.max_request_bytes, 10485760)
        # The example spells out the SPEC defaults: it changes nothing silently.
        defaults = GatewayConfig()
        for field in (
            "sts_timeout",
            "upstream_timeout",
            "read_header_timeout",
            "read_timeout",
            "write_timeout",
            "idle_timeout",
            "log_level",
        ):
            self.assertEqual(getattr(config, field), getattr(defaults, field), field)
        self.assertEqual(log_level_from(environ), "info")
        credentials = load_server_certificate(cert_file, key_file)
        self.assertEqual(credentials.leaf, leaf.cert)


class UnitFileTests(SynchronousTestCase):
    """C{etc/caracal-gateway.service}."""

    def setUp(self) -> None:
        self.text = _read(UNIT)
        self.unit = parse_unit(self.text)
        self.service = self.unit["Service"]
        self.settings = dict(self.service)

    def test_hardening_directives(self) -> None:
        """The sandbox the gateway runs in."""
        expected = {
            "User": "caracal",
            "Group": "caracal",
            "EnvironmentFile": "/etc/caracal/gateway.env",
            "ExecReload": "/bin/kill -HUP $MAINPID",
            "KillSignal": "SIGTERM",
            "TimeoutStopSec": "30",
            "Restart": "on-failure",
            "RuntimeDirectory": "caracal-gateway",
            "LogsDirectory": "caracal-gateway",
            "StateDirectory": "caracal-gateway caracal-gateway/audit-spool",
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "PrivateDevices": "yes",
            "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes",
            "ProtectKernelLogs": "yes",
            "ProtectControlGroups": "yes",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
            "RestrictNamespaces": "yes",
            "LockPersonality": "yes",
            "CapabilityBoundingSet": "",
            "AmbientCapabilities": "",
            "ReadOnlyPaths": "/etc/caracal",
            "LimitNOFILE": "65536",
            "Type": "exec",
        }
        for key, value in expected.items():
            self.assertIn((key, value), self.service, key)
        self.assertIn(("SystemCallFilter", "@system-service"), self.service)
        # Measured incompatible with pyOpenSSL's cffi callbacks; see
        # MemoryDenyWriteExecuteTests. Explicit, so nobody "fixes" it blindly.
        self.assertEqual(self.settings["MemoryDenyWriteExecute"], "no")

    def test_stop_timeout_covers_drain(self) -> None:
        """systemd waits longer than the gateway's 25 s drain before SIGKILL."""
        self.assertGreater(int(self.settings["TimeoutStopSec"]), 25)

    def test_exec_start(self) -> None:
        """
        twistd in the foreground, pidfile in the RuntimeDirectory, the
        reopening JSON logger, the caracal-gateway plugin.
        """
        argv = shlex.split(self.settings["ExecStart"])
        self.assertEqual(os.path.basename(argv[0]), "twistd")
        self.assertIn("--nodaemon", argv)
        pidfile = argv[argv.index("--pidfile") + 1]
        self.assertEqual(pidfile, "/run/caracal-gateway/twistd.pid")
        self.assertTrue(pidfile.startswith(f"/run/{self.settings['RuntimeDirectory']}/"))
        logger = argv[argv.index("--logger") + 1]
        self.assertEqual(logger, "caracal.gateway.logfile.observer")
        self.assertTrue(callable(namedAny(logger)))
        self.assertEqual(argv[-1], "caracal-gateway")
        self.assertNotIn("--logfile", argv)

    def test_twistd_accepts_command_line(self) -> None:
        """twistd's own option parser accepts ExecStart's arguments and finds the plugin."""
        from twisted.scripts.twistd import ServerOptions

        argv = shlex.split(self.settings["ExecStart"])[1:]
        options = ServerOptions()
        options.parseOptions(argv)
        self.assertTrue(options["nodaemon"])
        self.assertEqual(options.subCommand, "caracal-gateway")
        self.assertIs(options["logger"], namedAny("caracal.gateway.logfile.observer"))

    def test_paths_agree(self) -> None:
        """
        The env example's log file is in the unit's LogsDirectory and matched
        by the logrotate pattern; logrotate signals the pid in the unit's pidfile.
        """
        active, _ = parse_env_file(_read(ENV_EXAMPLE))
        log_path = active["CARACAL_LOG_FILE"]
        self.assertEqual(os.path.dirname(log_path), f"/var/log/{self.settings['LogsDirectory']}")
        rotate = _read(LOGROTATE)
        pattern = re.search(r"^(/\S+)\s*\{", rotate, re.MULTILINE).group(1)
        self.assertTrue(fnmatch.fnmatch(log_path, pattern), (log_path, pattern))
        argv = shlex.split(self.settings["ExecStart"])
        pidfile = argv[argv.index("--pidfile") + 1]
        self.assertIn(f'kill -USR1 "$(cat {pidfile})"', rotate)

    def test_systemd_analyze_verify(self) -> None:
        """
        C{systemd-analyze verify} finds nothing to say. ExecStart points at
        this machine's twistd (the unit's /opt path need not exist here).
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        twistd = _twistd()
        if twistd is None:
            raise SkipTest("no twistd executable to stand in for /opt/caracal-gateway/bin/twistd")
        self.assertIn("/opt/caracal-gateway/bin/twistd ", self.text)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        copy = os.path.join(directory, "caracal-gateway.service")
        with open(copy, "w", encoding="utf-8") as f:
            f.write(self.text.replace("/opt/caracal-gateway/bin/twistd ", f"{twistd} "))
        result = subprocess.run(
            [analyze, "verify", copy],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(
            (result.returncode, result.stdout.strip(), result.stderr.strip()), (0, "", "")
        )


_MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0):
        sys.exit(3)
    from twisted.internet.ssl import optionsForClientTLS
    try:
        optionsForClientTLS("sts.caracal.test").clientConnectionForTLS(None)
    except MemoryError:
        sys.exit(4)
    """
)


class MemoryDenyWriteExecuteTests(SynchronousTestCase):
    """
    Why the unit says C{MemoryDenyWriteExecute=no}: under W^X (here the
    kernel's C{PR_SET_MDWE}, what systemd's directive enforces) an outbound
    pyOpenSSL connection cannot be created.
    """

    def test_outbound_tls_needs_write_execute_memory(self) -> None:
        """
        Fails when a cffi/pyOpenSSL release no longer needs W+X memory: then
        set C{MemoryDenyWriteExecute=yes} in the unit.
        """
        result = subprocess.run(
            [sys.executable, "-c", _MDWE_PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode == 3:
            raise SkipTest("this kernel has no PR_SET_MDWE (Linux 6.3+)")
        self.assertEqual(
            result.returncode,
            4,
            "outbound TLS works under W^X now: enable MemoryDenyWriteExecute in the unit\n"
            + result.stderr,
        )


_CHILD = textwrap.dedent(
    """
    import os, sys
    from twisted.internet import reactor, stdio
    from twisted.logger import Logger, globalLogBeginner
    from twisted.protocols.basic import LineReceiver
    from caracal.gateway import logfile

    observer = logfile.observer()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    log = Logger(namespace="caracal.test.child")
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))

    class Commands(LineReceiver):
        delimiter = b"\\n"

        def lineReceived(self, line):
            log.info("line {text}", text=line.decode())
            self.sendLine(b"ok")

        def connectionLost(self, reason):
            reactor.stop()

    stdio.StandardIO(Commands())
    reactor.run()
    """
)

DEADLINE = 15.0


class LogrotateTests(SynchronousTestCase):
    """
    The shipped logrotate snippet against a real process logging through
    C{caracal.gateway.logfile} (the same factory the unit's C{--logger}
    names), rotated by the real logrotate.
    """

    def setUp(self) -> None:
        self.logrotate = shutil.which("logrotate")
        if self.logrotate is None:
            raise SkipTest("logrotate is not installed (apt-get install logrotate)")
        self.directory = os.path.abspath(self.mktemp())
        self.log_directory = os.path.join(self.directory, "log")
        os.makedirs(self.log_directory, mode=0o750)
        self.log_path = os.path.join(self.log_directory, "gateway.log")
        self.pidfile = os.path.join(self.directory, "twistd.pid")
        self.state = os.path.join(self.directory, "logrotate.state")
        self.config = os.path.join(self.directory, "caracal-gateway.logrotate")
        self.write_config()
        self.child = self.start_child()

    def write_config(self) -> None:
        """The shipped snippet with its paths and owner moved into the test's directory."""
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        text = _read(LOGROTATE)
        for old, new in (
            ("/var/log/caracal-gateway/", self.log_directory + "/"),
            ("/run/caracal-gateway/twistd.pid", self.pidfile),
            ("su caracal caracal", f"su {user} {group}"),
            ("create 0640 caracal caracal", f"create 0640 {user} {group}"),
        ):
            self.assertIn(old, text)
            text = text.replace(old, new)
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(text)
        # logrotate refuses a config writable by others.
        os.chmod(self.config, 0o644)

    def start_child(self) -> subprocess.Popen:
        script = os.path.join(self.directory, "child.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(_CHILD)
        environ = dict(os.environ)
        environ["CARACAL_LOG_FILE"] = self.log_path
        environ["LOG_LEVEL"] = "info"
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, environ.get("PYTHONPATH")]))
        child = subprocess.Popen(
            [sys.executable, script, self.pidfile],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environ,
            cwd=self.directory,
        )
        self.addCleanup(self.stop_child, child)
        return child

    def stop_child(self, child: subprocess.Popen) -> None:
        if child.poll() is None:
            child.stdin.close()
            try:
                child.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        child.stdout.close()
        child.stderr.close()

    def say(self, text: str) -> None:
        """Have the child log C{line <text>}; return once it is written."""
        self.child.stdin.write(text.encode() + b"\n")
        self.child.stdin.flush()
        ready, _, _ = select.select([self.child.stdout], [], [], DEADLINE)
        if not ready:
            self.fail(f"child did not answer within {DEADLINE}s")
        answer = self.child.stdout.readline()
        if answer != b"ok\n":
            self.child.kill()
            self.fail(f"child answered {answer!r}; stderr: {self.child.stderr.read()!r}")

    def rotate(self) -> None:
        """Run logrotate (forced, as cron would daily) and wait for the reopen."""
        result = subprocess.run(
            [self.logrotate, "-f", "-s", self.state, self.config],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        deadline = time.monotonic() + DEADLINE
        reopened = f"log file reopened: {self.log_path}"
        while reopened not in self.messages(self.log_path):
            if time.monotonic() > deadline:
                self.fail("the gateway did not reopen its log file after SIGUSR1")
            time.sleep(0.02)

    def messages(self, path: str) -> list[str]:
        if not os.path.exists(path):
            return []
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line)["msg"] for line in f if line.strip()]

    def test_rotation_reopens(self) -> None:
        """
        Two daily rotations: lines before each stay in the rotated file,
        lines after go to the new file created 0640; the older rotation is
        compressed, the latest not (delaycompress), the process never restarts.
        """
        self.say("before-1")
        self.say("before-2")
        with open(self.pidfile) as f:
            self.assertEqual(int(f.read()), self.child.pid)

        self.rotate()
        self.say("after-1")

        self.assertEqual(self.messages(self.log_path + ".1"), ["line before-1", "line before-2"])
        self.assertEqual(
            self.messages(self.log_path), [f"log file reopened: {self.log_path}", "line after-1"]
        )
        self.assertEqual(stat.S_IMODE(os.stat(self.log_path).st_mode), 0o640)

        self.rotate()
        self.say("after-2")

        self.assertEqual(self.messages(self.log_path + ".2.gz"), ["line before-1", "line before-2"])
        self.assertEqual(
            self.messages(self.log_path + ".1"),
            [f"log file reopened: {self.log_path}", "line after-1"],
        )
        self.assertEqual(
            self.messages(self.log_path), [f"log file reopened: {self.log_path}", "line after-2"]
        )
        self.assertIsNone(self.child.poll())

    def test_no_rotation_when_empty(self) -> None:
        """notifempty: an empty log is left alone and the process is not signalled."""
        self.say("warm-up")
        os.truncate(self.log_path, 0)
        result = subprocess.run(
            [self.logrotate, "-f", "-s", self.state, self.config],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(os.path.exists(self.log_path + ".1"))
        self.say("still-here")
        self.assertEqual(self.messages(self.log_path), ["line still-here"])
