# -*- test-case-name: tests.test_checkconfig -*-
"""
Unit tests for L{caracal.gateway.checkconfig}: each checklist item's verdict
from a configuration (and certificates made on the fly), the report's
format, the exit status, and the admin subcommand's wiring. The network
probes are replaced by fakes; nothing here touches a socket.
"""

from __future__ import annotations

import datetime
import io
import os
import secrets

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived

from caracal.gateway import admin, checkconfig, probes
from caracal.gateway.checkconfig import (
    FAIL,
    PASS,
    WARN,
    Finding,
    ProbeFailed,
    Probes,
)
from caracal.gateway.config import ConfigError, GatewayConfig
from caracal.gateway.tls import load_server_certificate
from tests.support.certs import make_authority, make_chain, make_leaf

NOW = datetime.datetime.now(datetime.timezone.utc)
HMAC_HEX = secrets.token_hex(32)
DB_PASSWORD = "pg-Secret-7731"
REDIS_PASSWORD = "redis-Secret-4409"


def _config(**fields) -> GatewayConfig:
    defaults = {
        "env": "production",
        "port": 8081,
        "tls_cert_file": "/etc/caracal/tls/server.crt",
        "tls_key_file": "/etc/caracal/tls/server.key",
        "sts_url": "https://sts.example:8443",
        "database_url": f"postgresql://gw:{DB_PASSWORD}@db.example:5432/caracal",
        "redis_url": f"redis://:{REDIS_PASSWORD}@redis.example:6379/0",
        "streams_hmac_key": bytes.fromhex(HMAC_HEX),
    }
    defaults.update(fields)
    return GatewayConfig(**defaults)


class RecordingProbes:
    """Fake probes: answer from C{outcomes} (a str, or a L{ProbeFailed}) and record calls."""

    def __init__(self, **outcomes) -> None:
        self.outcomes = {"sts": "up", "redis": "PONG", "postgres": "table present"}
        self.outcomes.update(outcomes)
        self.calls: list[tuple[str, float]] = []

    def _probe(self, name):
        def probe(config, timeout):
            self.calls.append((name, timeout))
            outcome = self.outcomes[name]
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        return probe

    def probes(self) -> Probes:
        return Probes(
            sts=self._probe("sts"), redis=self._probe("redis"), postgres=self._probe("postgres")
        )


def _statuses(findings) -> dict[str, str]:
    return {f.item: f.status for f in findings}


class CertificateDirectory:
    """A chain (root, intermediate, leaf) written to a fresh directory."""

    def __init__(self, directory: str, **leaf_options) -> None:
        os.makedirs(directory)
        self.directory = directory
        self.root, self.leaf = make_chain(directory, **leaf_options)
        self.cert_file = os.path.join(directory, "server.crt")
        self.key_file = os.path.join(directory, "server.key")
        self.ca_file = os.path.join(directory, "server-ca.pem")


class EnvironmentTests(SynchronousTestCase):
    def test_production(self):
        """CARACAL_ENV=production passes."""
        finding = checkconfig.check_environment(_config())
        self.assertEqual(finding.status, PASS)
        self.assertEqual(finding.item, "CARACAL_ENV")

    def test_dev(self):
        """CARACAL_ENV=dev fails, saying so."""
        finding = checkconfig.check_environment(_config(env="dev"))
        self.assertEqual(finding.status, FAIL)
        self.assertIn("dev", finding.reason)


class ExpiryTests(SynchronousTestCase):
    def setUp(self):
        self.certs = CertificateDirectory(self.mktemp())
        self.credentials = load_server_certificate(self.certs.cert_file, self.certs.key_file)

    def test_valid(self):
        """A certificate well within its validity passes, naming the file and its end date."""
        finding = checkconfig.check_expiry(self.credentials, NOW)
        self.assertEqual(finding.status, PASS)
        self.assertIn(self.certs.cert_file, finding.reason)
        self.assertIn("valid until", finding.reason)

    def test_within_fourteen_days_warns(self):
        """A certificate expiring within fourteen days warns, with the days left."""
        now = self.credentials.not_after - datetime.timedelta(days=10, hours=1)
        finding = checkconfig.check_expiry(self.credentials, now)
        self.assertEqual(finding.status, WARN)
        self.assertIn("expires in 10 days", finding.reason)

    def test_fifteen_days_left_passes(self):
        """Fifteen days before expiry is still a pass."""
        now = self.credentials.not_after - datetime.timedelta(days=15)
        self.assertEqual(checkconfig.check_expiry(self.credentials, now).status, PASS)

    def test_expired_fails(self):
        """A certificate one second past its end fails as expired."""
        now = self.credentials.not_after + datetime.timedelta(seconds=1)
        finding = checkconfig.check_expiry(self.credentials, now)
        self.assertEqual(finding.status, FAIL)
        self.assertIn("expired", finding.reason)

    def test_not_yet_valid_fails(self):
        """A certificate not yet valid fails, saying from when it is valid."""
        now = self.credentials.not_before - datetime.timedelta(days=1)
        finding = checkconfig.check_expiry(self.credentials, now)
        self.assertEqual(finding.status, FAIL)
        self.assertIn("not valid before", finding.reason)


class ChainTests(SynchronousTestCase):
    def setUp(self):
        self.root = make_authority()
        self.intermediate = make_authority("Caracal Test Intermediate", issuer=self.root)
        self.leaf = make_leaf(self.intermediate, intermediates=(self.intermediate,))

    def test_leaf_then_issuers(self):
        """A leaf followed by its issuer passes, counting the issuers."""
        finding = checkconfig.check_chain((self.leaf.cert, self.intermediate.cert))
        self.assertEqual(finding, Finding(PASS, "chain order", finding.reason))
        self.assertIn("1 issuer", finding.reason)

    def test_leaf_intermediate_root(self):
        """A leaf, its intermediate and the root, in that order, pass."""
        chain = (self.leaf.cert, self.intermediate.cert, self.root.cert)
        self.assertEqual(checkconfig.check_chain(chain).status, PASS)

    def test_wrong_order(self):
        """A chain out of order fails, naming the wrong link and where its issuer is."""
        finding = checkconfig.check_chain((self.leaf.cert, self.root.cert, self.intermediate.cert))
        self.assertEqual(finding.status, FAIL)
        self.assertIn(
            "certificate 2 (CN=Caracal Test Root) did not issue certificate 1", finding.reason
        )
        self.assertIn("its issuer is certificate 3", finding.reason)

    def test_unrelated_intermediate(self):
        """A second certificate that did not issue the leaf fails, without pointing at an issuer."""
        stranger = make_authority("Somebody Else")
        finding = checkconfig.check_chain((self.leaf.cert, stranger.cert))
        self.assertEqual(finding.status, FAIL)
        self.assertNotIn("its issuer is", finding.reason)

    def test_leaf_only(self):
        """A leaf alone passes and names its issuer."""
        leaf = make_leaf(self.root)
        finding = checkconfig.check_chain((leaf.cert,))
        self.assertEqual(finding.status, PASS)
        self.assertIn("leaf only, issued by CN=Caracal Test Root", finding.reason)

    def test_self_signed_warns(self):
        """A self-signed certificate alone warns."""
        self.assertEqual(checkconfig.check_chain((self.root.cert,)).status, WARN)

    def test_ca_first_warns(self):
        """A chain whose first certificate is a CA warns, saying so."""
        finding = checkconfig.check_chain((self.intermediate.cert, self.root.cert))
        self.assertEqual(finding.status, WARN)
        self.assertIn("is a CA", finding.reason)


class TLSTests(SynchronousTestCase):
    def test_good(self):
        """A matching certificate and key pass the certificate, chain order and key items."""
        certs = CertificateDirectory(self.mktemp())
        config = _config(tls_cert_file=certs.cert_file, tls_key_file=certs.key_file)
        findings = checkconfig.check_tls(config, NOW)
        self.assertEqual(
            [(f.item, f.status) for f in findings],
            [("certificate", PASS), ("chain order", PASS), ("key", PASS)],
        )

    def test_expiring_soon(self):
        """A certificate expiring in three days makes the certificate item a warning."""
        soon = NOW + datetime.timedelta(days=3)
        certs = CertificateDirectory(self.mktemp(), not_after=soon)
        config = _config(tls_cert_file=certs.cert_file, tls_key_file=certs.key_file)
        self.assertEqual(_statuses(checkconfig.check_tls(config, NOW))["certificate"], WARN)

    def test_expired_file_named(self):
        """An expired certificate is one failure naming TLS_CERT_FILE and its path."""
        certs = CertificateDirectory(self.mktemp(), not_after=NOW - datetime.timedelta(days=1))
        config = _config(tls_cert_file=certs.cert_file, tls_key_file=certs.key_file)
        [finding] = checkconfig.check_tls(config, NOW)
        self.assertEqual(finding.status, FAIL)
        self.assertIn(f"TLS_CERT_FILE {certs.cert_file}", finding.reason)
        self.assertIn("expired", finding.reason)

    def test_key_mismatch(self):
        """A key that does not match the certificate is one failure naming TLS_KEY_FILE."""
        certs = CertificateDirectory(self.mktemp())
        other = CertificateDirectory(self.mktemp())
        config = _config(tls_cert_file=certs.cert_file, tls_key_file=other.key_file)
        [finding] = checkconfig.check_tls(config, NOW)
        self.assertEqual(finding.status, FAIL)
        self.assertIn(f"TLS_KEY_FILE {other.key_file}: does not match", finding.reason)

    def test_openssl_refusal(self):
        """Credentials that OpenSSL refuses fail the key item."""
        certs = CertificateDirectory(self.mktemp())
        config = _config(tls_cert_file=certs.cert_file, tls_key_file=certs.key_file)

        def refuse(credentials):
            raise ConfigError("OpenSSL refused the certificate")

        findings = checkconfig.check_tls(config, NOW, accept=refuse)
        self.assertEqual(_statuses(findings)["key"], FAIL)

    def test_plaintext(self):
        """Serving plaintext HTTP is one TLS failure."""
        config = _config(env="dev", insecure_http=True, tls_cert_file=None, tls_key_file=None)
        [finding] = checkconfig.check_tls(config, NOW)
        self.assertEqual((finding.item, finding.status), ("TLS", FAIL))


class CABundleTests(SynchronousTestCase):
    def test_unset(self):
        """Unset CA bundles pass, using the platform's trust store."""
        findings = checkconfig.check_ca_bundles(_config())
        self.assertEqual(_statuses(findings), {"STS_CA_FILE": PASS, "UPSTREAM_CA_FILE": PASS})
        self.assertIn("platform", findings[0].reason)

    def test_good_and_bad(self):
        """A readable CA bundle passes and a file holding no certificate fails, naming it."""
        certs = CertificateDirectory(self.mktemp())
        config = _config(sts_ca_file=certs.ca_file, upstream_ca_file=certs.key_file)
        findings = checkconfig.check_ca_bundles(config)
        self.assertEqual(_statuses(findings), {"STS_CA_FILE": PASS, "UPSTREAM_CA_FILE": FAIL})
        self.assertIn(f"UPSTREAM_CA_FILE {certs.key_file}", findings[1].reason)


class EscapeHatchTests(SynchronousTestCase):
    def test_none_set(self):
        """No escape hatch set: every escape hatch item passes."""
        findings = checkconfig.check_escape_hatches(_config())
        self.assertEqual(
            _statuses(findings),
            {
                "INSECURE_HTTP": PASS,
                "INSECURE_STS": PASS,
                "JTI_FAIL_OPEN": PASS,
                "REVOCATION_FAIL_OPEN": PASS,
            },
        )

    def test_each_set(self):
        """Each escape hatch that is set fails its own item, and only its own."""
        config = _config(env="dev", insecure_sts=True, jti_fail_open=True)
        findings = checkconfig.check_escape_hatches(config)
        self.assertEqual(
            _statuses(findings),
            {
                "INSECURE_HTTP": PASS,
                "INSECURE_STS": FAIL,
                "JTI_FAIL_OPEN": FAIL,
                "REVOCATION_FAIL_OPEN": PASS,
            },
        )
        config = _config(env="dev", insecure_http=True)
        self.assertEqual(_statuses(checkconfig.check_escape_hatches(config))["INSECURE_HTTP"], FAIL)

    def test_revocation_fail_open(self):
        """
        C{REVOCATION_FAIL_OPEN=true} (dev only) is a FAIL: revoked sessions
        would pass while the revocation state is unavailable.
        """
        for value, status in ((True, FAIL), (False, PASS)):
            findings = checkconfig.check_escape_hatches(
                _config(env="dev", revocation_fail_open=value)
            )
            self.assertEqual(_statuses(findings)["REVOCATION_FAIL_OPEN"], status, value)


class MetricsTests(SynchronousTestCase):
    """Who may read /metrics (SPEC section 12)."""

    def test_production_default_not_served(self):
        """Production with neither variable: 404 on the public listener, a PASS."""
        finding = checkconfig.check_metrics(_config())
        self.assertEqual(finding.status, PASS)
        self.assertIn("404", finding.reason)

    def test_exposed_without_bearer_warns(self):
        """Served on METRICS_ADDRESS, or publicly in dev, without a bearer: WARN."""
        for config in (
            _config(metrics_address="127.0.0.1:9090"),
            _config(env="dev"),
        ):
            self.assertEqual(checkconfig.check_metrics(config).status, WARN, config)

    def test_bearer_passes(self):
        """A long bearer guards /metrics wherever it is served."""
        bearer = "m" * 8 + secrets.token_hex(16)
        for config in (
            _config(metrics_bearer=bearer),
            _config(metrics_bearer=bearer, metrics_address="127.0.0.1:9090"),
        ):
            finding = checkconfig.check_metrics(config)
            self.assertEqual(finding.status, PASS, config)
            self.assertNotIn(bearer, finding.reason)

    def test_short_bearer_warns(self):
        """A bearer shorter than 16 characters is guessable."""
        finding = checkconfig.check_metrics(_config(metrics_bearer="abc123"))
        self.assertEqual(finding.status, WARN)
        self.assertNotIn("abc123", finding.reason)


class PortTests(SynchronousTestCase):
    def test_8081(self):
        """The production port 8081 passes."""
        self.assertEqual(checkconfig.check_port(_config()).status, PASS)

    def test_other(self):
        """Any other port fails, naming it."""
        finding = checkconfig.check_port(_config(env="dev", port=8443))
        self.assertEqual(finding.status, FAIL)
        self.assertIn("8443", finding.reason)


class HMACKeyTests(SynchronousTestCase):
    def test_random(self):
        """A random 32-byte key passes without the key appearing in the reason."""
        finding = checkconfig.check_hmac_key(_config())
        self.assertEqual(finding.status, PASS)
        self.assertNotIn(HMAC_HEX, finding.reason)

    def test_missing(self):
        """A missing STREAMS_HMAC_KEY fails."""
        self.assertEqual(checkconfig.check_hmac_key(_config(streams_hmac_key=None)).status, FAIL)

    def test_short(self):
        """A key shorter than 32 bytes fails, giving its length."""
        finding = checkconfig.check_hmac_key(_config(streams_hmac_key=b"k" * 31))
        self.assertEqual(finding.status, FAIL)
        self.assertIn("31 bytes", finding.reason)

    def test_same_byte_warns(self):
        """A key of one repeated byte warns, counting its distinct bytes."""
        finding = checkconfig.check_hmac_key(_config(streams_hmac_key=b"\x00" * 32))
        self.assertEqual(finding.status, WARN)
        self.assertIn("1 distinct", finding.reason)

    def test_pattern_warns(self):
        """A key made of a repeated short pattern warns."""
        finding = checkconfig.check_hmac_key(_config(streams_hmac_key=b"secret!!" * 8))
        self.assertEqual(finding.status, WARN)

    def test_distinct_bytes_pass(self):
        """A key of 32 distinct bytes passes."""
        finding = checkconfig.check_hmac_key(_config(streams_hmac_key=bytes(range(32))))
        self.assertEqual(finding.status, PASS)


class UpstreamTests(SynchronousTestCase):
    def test_private_refused(self):
        """Private upstreams refused (the default) pass."""
        self.assertEqual(checkconfig.check_upstreams(_config()).status, PASS)

    def test_private_with_allowlist(self):
        """Private upstreams limited by an allow-list pass, listing the hosts."""
        config = _config(
            allow_private_upstreams=True,
            upstream_host_allowlist=frozenset({"api.internal", "pay.internal"}),
        )
        finding = checkconfig.check_upstreams(config)
        self.assertEqual(finding.status, PASS)
        self.assertIn("api.internal, pay.internal", finding.reason)

    def test_private_without_allowlist(self):
        """Private upstreams without an allow-list fail."""
        finding = checkconfig.check_upstreams(_config(env="dev", allow_private_upstreams=True))
        self.assertEqual(finding.status, FAIL)


class ServiceTests(SynchronousTestCase):
    def test_all_answer(self):
        """
        Every probe answering passes STS, Redis and Postgres, each probed with the timeout and
        reported without passwords.
        """
        fake = RecordingProbes()
        findings = checkconfig.check_services(_config(), fake.probes(), 3.0)
        self.assertEqual(_statuses(findings), {"STS": PASS, "Redis": PASS, "Postgres": PASS})
        self.assertEqual(fake.calls, [("sts", 3.0), ("redis", 3.0), ("postgres", 3.0)])
        text = checkconfig.format_report(findings)
        self.assertIn("https://sts.example:8443: up", text)
        self.assertIn("postgresql://gw:***@db.example:5432/caracal: table present", text)
        self.assertNotIn(DB_PASSWORD, text)
        self.assertNotIn(REDIS_PASSWORD, text)

    def test_failures_named(self):
        """A failing probe fails its own service item with the probe's reason."""
        fake = RecordingProbes(
            redis=ProbeFailed("cannot connect: Connection refused"),
            postgres=ProbeFailed("gateway_resources table is missing"),
        )
        findings = checkconfig.check_services(_config(), fake.probes(), 1.5)
        self.assertEqual(_statuses(findings), {"STS": PASS, "Redis": FAIL, "Postgres": FAIL})
        self.assertIn("Connection refused", findings[1].reason)
        self.assertIn("table is missing", findings[2].reason)

    def test_plaintext_sts_not_probed(self):
        """A plaintext STS URL fails as not TLS and is not probed."""
        fake = RecordingProbes()
        config = _config(env="dev", insecure_sts=True, sts_url="http://sts.example")
        findings = checkconfig.check_services(config, fake.probes(), 3.0)
        self.assertEqual(findings[0].status, FAIL)
        self.assertIn("not TLS", findings[0].reason)
        self.assertNotIn("sts", [name for name, _ in fake.calls])


class RunChecksTests(SynchronousTestCase):
    def environ(self, **overrides):
        certs = CertificateDirectory(self.mktemp())
        environ = {
            "CARACAL_ENV": "production",
            "TLS_CERT_FILE": certs.cert_file,
            "TLS_KEY_FILE": certs.key_file,
            "STS_URL": "https://sts.example/",
            "STS_CA_FILE": certs.ca_file,
            "DATABASE_URL": f"postgresql://gw:{DB_PASSWORD}@db.example/caracal",
            "REDIS_URL": f"redis://:{REDIS_PASSWORD}@redis.example:6379/0",
            "STREAMS_HMAC_KEY": HMAC_HEX,
        }
        environ.update(overrides)
        return {k: v for k, v in environ.items() if v is not None}

    def test_production_ready(self):
        """A production environment passes every item, in the checklist's order, and exits 0."""
        findings = checkconfig.run_checks(self.environ(), RecordingProbes().probes(), now=NOW)
        self.assertEqual([f for f in findings if f.status != PASS], [])
        self.assertEqual(
            [f.item for f in findings],
            [
                "configuration",
                "CARACAL_ENV",
                "certificate",
                "chain order",
                "key",
                "STS_CA_FILE",
                "UPSTREAM_CA_FILE",
                "INSECURE_HTTP",
                "INSECURE_STS",
                "JTI_FAIL_OPEN",
                "REVOCATION_FAIL_OPEN",
                "PORT",
                "STREAMS_HMAC_KEY",
                "upstreams",
                "/metrics",
                "STS",
                "Redis",
                "Postgres",
            ],
        )
        self.assertEqual(checkconfig.exit_status(findings), 0)

    def test_refused_configuration_is_one_failure(self):
        """A configuration startup would refuse is one failure, and no service is probed."""
        fake = RecordingProbes()
        findings = checkconfig.run_checks(self.environ(JTI_FAIL_OPEN="true"), fake.probes())
        self.assertEqual(
            findings,
            [
                Finding(
                    FAIL,
                    "configuration",
                    "startup would refuse it: JTI_FAIL_OPEN is forbidden when"
                    " CARACAL_ENV=production",
                )
            ],
        )
        self.assertEqual(fake.calls, [])
        self.assertEqual(checkconfig.exit_status(findings), 1)

    def test_every_refused_rule_reported(self):
        """
        A production environment missing both TLS files and the HMAC key,
        with a malformed duration, gets one FAIL per failed startup rule, in
        the order startup checks them, not only the first.
        """
        fake = RecordingProbes()
        environ = self.environ(
            TLS_CERT_FILE=None, TLS_KEY_FILE=None, STREAMS_HMAC_KEY=None, STS_TIMEOUT="soon"
        )
        findings = checkconfig.run_checks(environ, fake.probes())
        self.assertEqual(
            [f.reason for f in findings],
            [
                "startup would refuse it: STS_TIMEOUT must be a duration such as 250ms, 5s"
                " or 1m30s",
                "startup would refuse it: TLS_CERT_FILE/TLS_KEY_FILE required; set"
                " INSECURE_HTTP=true to run plaintext",
                "startup would refuse it: STREAMS_HMAC_KEY is required when CARACAL_ENV=production",
            ],
        )
        self.assertEqual({(f.status, f.item) for f in findings}, {(FAIL, "configuration")})
        self.assertEqual(fake.calls, [])

    def test_revocation_fail_open_in_production_fails(self):
        """C{REVOCATION_FAIL_OPEN=true} in production is a FAIL, whoever judges it."""
        findings = checkconfig.run_checks(
            self.environ(REVOCATION_FAIL_OPEN="true"), RecordingProbes().probes(), now=NOW
        )
        failed = [f for f in findings if f.status == FAIL]
        self.assertEqual(len(failed), 1, failed)
        self.assertIn("REVOCATION_FAIL_OPEN", failed[0].item + failed[0].reason)
        self.assertEqual(checkconfig.exit_status(findings), 1)

    def test_metrics_exposed_without_bearer_warns(self):
        """METRICS_ADDRESS without METRICS_BEARER is a WARN, not a FAIL."""
        findings = checkconfig.run_checks(
            self.environ(METRICS_ADDRESS="10.0.0.5:9090"), RecordingProbes().probes(), now=NOW
        )
        [metrics] = [f for f in findings if f.item == "/metrics"]
        self.assertEqual(metrics.status, WARN)
        self.assertIn("10.0.0.5:9090", metrics.reason)
        self.assertEqual(checkconfig.exit_status(findings), 0)

    def test_dev_environment_fails_the_checklist(self):
        """A dev environment fails every production rule it breaks, all in one report."""
        environ = self.environ(
            CARACAL_ENV="dev",
            PORT="9443",
            INSECURE_STS="true",
            STS_URL="http://127.0.0.1:8080",
            ALLOW_PRIVATE_UPSTREAMS="true",
        )
        findings = checkconfig.run_checks(environ, RecordingProbes().probes(), now=NOW)
        failed = {f.item for f in findings if f.status == FAIL}
        self.assertEqual(failed, {"CARACAL_ENV", "INSECURE_STS", "PORT", "upstreams", "STS"})
        self.assertEqual(checkconfig.exit_status(findings), 1)

    def test_probe_timeout_passed(self):
        """The timeout given to L{checkconfig.run_checks} reaches every probe."""
        fake = RecordingProbes()
        checkconfig.run_checks(self.environ(), fake.probes(), now=NOW, timeout=0.25)
        self.assertEqual({timeout for _, timeout in fake.calls}, {0.25})


class ReportTests(SynchronousTestCase):
    def test_line(self):
        """A finding is one line: status, padded item, reason with its whitespace folded."""
        line = checkconfig.format_finding(Finding(WARN, "PORT", "a\n  reason"), width=6)
        self.assertEqual(line, "WARN  PORT   a reason")

    def test_report(self):
        """The report aligns the items and ends with the counts and the verdict."""
        findings = [
            Finding(PASS, "PORT", "8081"),
            Finding(WARN, "certificate", "expires in 3 days"),
            Finding(FAIL, "Redis", "refused"),
        ]
        self.assertEqual(
            checkconfig.format_report(findings),
            "PASS  PORT        8081\n"
            "WARN  certificate expires in 3 days\n"
            "FAIL  Redis       refused\n"
            "1 passed, 1 warnings, 1 failed: NOT ready for production\n",
        )

    def test_exit_status(self):
        """The exit status is 1 if any finding failed, 0 otherwise (warnings included)."""
        self.assertEqual(
            checkconfig.exit_status([Finding(PASS, "a", ""), Finding(WARN, "b", "")]), 0
        )
        self.assertEqual(
            checkconfig.exit_status([Finding(PASS, "a", ""), Finding(FAIL, "b", "")]), 1
        )
        self.assertEqual(checkconfig.exit_status([]), 0)

    def test_ready_verdict(self):
        """A report without failures ends with 'ready for production'."""
        report = checkconfig.format_report([Finding(PASS, "PORT", "8081")])
        self.assertTrue(report.endswith("1 passed, 0 warnings, 0 failed: ready for production\n"))


class SettledProbesTests(SynchronousTestCase):
    """L{probes.settled_probes} without a network."""

    def test_refused_configuration_probes_nothing(self):
        """
        A configuration startup would refuse starts no probe (nor the
        reactor): each probe answers that it was not probed.
        """
        settled = probes.settled_probes({"CARACAL_ENV": "staging"}, 1.0)
        for probe in (settled.sts, settled.redis, settled.postgres):
            error = self.assertRaises(ProbeFailed, probe, None, 1.0)
            self.assertEqual(str(error), "not probed")


class ConnectionFailureTests(SynchronousTestCase):
    def test_tls_verification(self):
        """A certificate verification failure is described as a failed TLS handshake."""
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        failure = Failure(ResponseNeverReceived([Failure(error)]))
        self.assertEqual(
            probes.describe_connection_failure(failure),
            "TLS handshake failed: certificate verify failed",
        )

    def test_hostname(self):
        """A host name mismatch is described as such."""
        failure = Failure(ResponseNeverReceived([Failure(VerificationError(errors=[]))]))
        self.assertIn("does not match the host name", probes.describe_connection_failure(failure))

    def test_refused_and_timeout(self):
        """A refused connection and a cancelled (timed out) one each get their own words."""
        refused = Failure(internet_error.ConnectionRefusedError())
        self.assertEqual(probes.describe_connection_failure(refused), "connection refused")
        cancelled = Failure(defer.CancelledError())
        self.assertEqual(probes.describe_connection_failure(cancelled), "no answer in time")


class EnvFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_systemd_format(self):
        """An env file in systemd's format is read: comments, C{export}, spaces and quotes."""
        path = self.write(
            "# comment\n; another\n\nCARACAL_ENV=production\nexport PORT = 8081\n"
            "STS_URL=\"https://sts.example\"\nLOG_LEVEL='warn'\n"
        )
        self.assertEqual(
            checkconfig.read_env_file(path),
            {
                "CARACAL_ENV": "production",
                "PORT": "8081",
                "STS_URL": "https://sts.example",
                "LOG_LEVEL": "warn",
            },
        )

    def test_bad_line(self):
        """A line that is not an assignment is refused, naming its line number."""
        path = self.write("CARACAL_ENV=production\nnot a variable\n")
        with self.assertRaises(ValueError) as raised:
            checkconfig.read_env_file(path)
        self.assertIn("line 2", str(raised.exception))


class AdminSubcommandTests(SynchronousTestCase):
    """C{caracal-gateway-admin check-config}, up to the point where probes would run."""

    def run_admin(self, *argv, environ=None):
        stdout, stderr = io.StringIO(), io.StringIO()
        status = admin.main(list(argv), environ=environ or {}, stdout=stdout, stderr=stderr)
        return status, stdout.getvalue(), stderr.getvalue()

    def test_registered(self):
        """C{caracal-gateway-admin} knows the C{check-config} subcommand."""
        self.assertIn("check-config", admin.COMMANDS)

    def test_refused_configuration(self):
        """Every rule the environment fails is one FAIL line, the first one first."""
        status, out, err = self.run_admin("check-config", environ={"CARACAL_ENV": "staging"})
        self.assertEqual(status, 1)
        prefix = "FAIL  configuration startup would refuse it: "
        self.assertEqual(
            out.splitlines(),
            [
                prefix + "CARACAL_ENV must be production or dev",
                prefix
                + "TLS_CERT_FILE/TLS_KEY_FILE required; set INSECURE_HTTP=true to run plaintext",
                prefix + "STREAMS_HMAC_KEY is required when CARACAL_ENV=production",
                prefix + "STS_URL is required",
                prefix + "DATABASE_URL is required",
                prefix + "REDIS_URL is required",
                "0 passed, 0 warnings, 6 failed: NOT ready for production",
            ],
        )
        self.assertEqual(err, "")

    def test_env_file_read_over_environment(self):
        """With C{--env-file}, the file's variables are judged, not the process environment's."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("CARACAL_ENV=production\nINSECURE_HTTP=true\n")
        status, out, _ = self.run_admin(
            "check-config", "--env-file", path, environ={"CARACAL_ENV": "staging"}
        )
        self.assertEqual(status, 1)
        self.assertIn("INSECURE_HTTP and INSECURE_STS are forbidden", out)

    def test_unreadable_env_file(self):
        """An unreadable C{--env-file} is a usage error (status 2) naming the option."""
        status, out, err = self.run_admin("check-config", "--env-file", self.mktemp())
        self.assertEqual(status, 2)
        self.assertEqual(out, "")
        self.assertIn("--env-file", err)
        self.assertIn("No such file", err)

    def test_database_url_option_refused(self):
        """C{--database-url} is refused: check-config reads the gateway's environment."""
        status, _, err = self.run_admin("check-config", "--database-url", "postgresql://x/y")
        self.assertEqual(status, 2)
        self.assertIn("reads the gateway's environment", err)

    def test_bad_timeout(self):
        """A non-positive C{--timeout} is a usage error naming the option."""
        status, _, err = self.run_admin("check-config", "--timeout", "0")
        self.assertEqual(status, 2)
        self.assertIn("--timeout", err)
