# -*- test-case-name: tests.test_config -*-
"""
Tests for L{caracal.gateway.config}: every startup rule of SPEC section 2,
refused and accepted, in production and in dev, with the operator's message
asserted verbatim; the value syntaxes (Go durations, Go booleans, integers,
C{REDIS_URL}); the defaults; and the redaction of secrets.
"""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.config import (
    ConfigError,
    GatewayConfig,
    RedisAddress,
    parse_bool,
    parse_duration,
    parse_redis_url,
    parse_size,
    read_secret,
    redact_url,
)

HMAC_KEY_HEX = "a1" * 32
DATABASE_PASSWORD = "pg-s3cret-pw"
REDIS_PASSWORD = "redis-s3cret-pw"

BOOLEANS = (
    "INSECURE_HTTP",
    "INSECURE_STS",
    "JTI_FAIL_OPEN",
    "REVOCATION_FAIL_OPEN",
    "ALLOW_PRIVATE_UPSTREAMS",
)
DURATIONS = {
    "STS_TIMEOUT": ("sts_timeout", 5.0),
    "UPSTREAM_TIMEOUT": ("upstream_timeout", 30.0),
    "READ_HEADER_TIMEOUT": ("read_header_timeout", 5.0),
    "READ_TIMEOUT": ("read_timeout", 30.0),
    "WRITE_TIMEOUT": ("write_timeout", 60.0),
    "IDLE_TIMEOUT": ("idle_timeout", 120.0),
}

MSG_ENV = "CARACAL_ENV must be production or dev"
MSG_TLS_PAIR = "TLS_CERT_FILE and TLS_KEY_FILE must both be set"
MSG_TLS_REQUIRED = "TLS_CERT_FILE/TLS_KEY_FILE required; set INSECURE_HTTP=true to run plaintext"
MSG_INSECURE = "INSECURE_HTTP and INSECURE_STS are forbidden when CARACAL_ENV=production"
MSG_JTI = "JTI_FAIL_OPEN is forbidden when CARACAL_ENV=production"
MSG_REVOCATION = "REVOCATION_FAIL_OPEN is forbidden when CARACAL_ENV=production"
MSG_PORT = "PORT must be 8081"
MSG_HMAC_REQUIRED = "STREAMS_HMAC_KEY is required when CARACAL_ENV=production"
MSG_HMAC_FORMAT = "STREAMS_HMAC_KEY must be hex-encoded and at least 32 bytes"
MSG_ALLOWLIST = (
    "UPSTREAM_HOST_ALLOWLIST is required when ALLOW_PRIVATE_UPSTREAMS=true in production"
)
MSG_STS_HTTPS = "STS_URL must use https; set INSECURE_STS=true to override"


def production(**overrides: str | None) -> dict[str, str]:
    """
    A complete, valid production environment with C{overrides} applied; an
    override of C{None} removes the variable.
    """
    environ = {
        "CARACAL_ENV": "production",
        "TLS_CERT_FILE": "/etc/caracal/tls/server.crt",
        "TLS_KEY_FILE": "/etc/caracal/tls/server.key",
        "STS_URL": "https://sts.example.com/",
        "DATABASE_URL": f"postgresql://gateway:{DATABASE_PASSWORD}@db.example.com:5432/caracal",
        "REDIS_URL": f"redis://:{REDIS_PASSWORD}@redis.example.com:6380/2",
        "STREAMS_HMAC_KEY": HMAC_KEY_HEX,
    }
    return _apply(environ, overrides)


def dev(**overrides: str | None) -> dict[str, str]:
    """The smallest valid dev environment (plaintext, no HMAC key) plus C{overrides}."""
    environ = {
        "CARACAL_ENV": "dev",
        "INSECURE_HTTP": "true",
        "STS_URL": "https://127.0.0.1:8443",
        "DATABASE_URL": "postgresql://root@127.0.0.1:5432/test",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    return _apply(environ, overrides)


def _apply(environ: dict[str, str], overrides: dict[str, str | None]) -> dict[str, str]:
    for name, value in overrides.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return environ


class ConfigTestMixin:
    def refused(self, environ: dict[str, str], message: str) -> None:
        """Assert that C{environ} is refused with exactly C{message}."""
        error = self.assertRaises(ConfigError, GatewayConfig.from_environ, environ)
        self.assertEqual(str(error), message)

    def accepted(self, environ: dict[str, str]) -> GatewayConfig:
        """Assert that C{environ} is accepted; return the configuration."""
        config = GatewayConfig.from_environ(environ)
        self.assertIsInstance(config, GatewayConfig)
        return config


class DefaultsTests(ConfigTestMixin, SynchronousTestCase):
    """Every variable left unset takes the SPEC's default."""

    def test_production_defaults(self) -> None:
        """
        Without CARACAL_ENV the configuration is production, with every default the SPEC gives.
        """
        config = self.accepted(production(CARACAL_ENV=None))
        self.assertEqual(config.env, "production")
        self.assertTrue(config.production)
        self.assertEqual(config.port, 8081)
        self.assertEqual(config.bind_address, "")
        self.assertFalse(config.insecure_http)
        self.assertFalse(config.insecure_sts)
        self.assertFalse(config.jti_fail_open)
        self.assertFalse(config.revocation_fail_open)
        self.assertFalse(config.allow_private_upstreams)
        self.assertEqual(config.upstream_host_allowlist, frozenset())
        self.assertIsNone(config.sts_ca_file)
        self.assertIsNone(config.upstream_ca_file)
        self.assertEqual(config.max_request_bytes, 10485760)
        self.assertEqual(config.log_level, "info")
        for attribute, default in DURATIONS.values():
            self.assertEqual(getattr(config, attribute), default, attribute)
        self.assertTrue(config.tls_enabled)
        self.assertEqual(config.escape_hatches(), [])

    def test_empty_value_is_unset(self) -> None:
        """A variable set to the empty string (or blanks) counts as unset."""
        config = self.accepted(production(CARACAL_ENV="", PORT=" ", STS_TIMEOUT=""))
        self.assertEqual(config.env, "production")
        self.assertEqual(config.port, 8081)
        self.assertEqual(config.sts_timeout, 5.0)

    def test_values_read(self) -> None:
        """Every setting given in the environment is read into the configuration."""
        config = self.accepted(
            dev(
                PORT="9443",
                BIND_ADDRESS="127.0.0.1",
                INSECURE_HTTP=None,
                TLS_CERT_FILE="/tmp/c.pem",
                TLS_KEY_FILE="/tmp/k.pem",
                STS_CA_FILE="/tmp/sts-ca.pem",
                UPSTREAM_CA_FILE="/tmp/up-ca.pem",
                MAX_REQUEST_BYTES="1024",
                LOG_LEVEL="DEBUG",
            )
        )
        self.assertEqual(config.env, "dev")
        self.assertFalse(config.production)
        self.assertEqual(config.port, 9443)
        self.assertEqual(config.bind_address, "127.0.0.1")
        self.assertEqual((config.tls_cert_file, config.tls_key_file), ("/tmp/c.pem", "/tmp/k.pem"))
        self.assertEqual(config.sts_ca_file, "/tmp/sts-ca.pem")
        self.assertEqual(config.upstream_ca_file, "/tmp/up-ca.pem")
        self.assertEqual(config.max_request_bytes, 1024)
        self.assertEqual(config.log_level, "debug")

    def test_sts_base_url(self) -> None:
        """C{sts_base_url} drops the trailing slash so paths can be appended."""
        config = self.accepted(production(STS_URL="https://sts.example.com/base/"))
        self.assertEqual(config.sts_base_url, "https://sts.example.com/base")
        config = self.accepted(production(STS_URL="https://sts.example.com"))
        self.assertEqual(config.sts_base_url, "https://sts.example.com")


class EnvironmentRuleTests(ConfigTestMixin, SynchronousTestCase):
    """C{CARACAL_ENV} is production or dev, nothing else."""

    def test_unknown_refused(self) -> None:
        """A CARACAL_ENV other than exactly production or dev is refused."""
        for value in ("staging", "Production", "DEV", "prod", "development"):
            self.refused(production(CARACAL_ENV=value), MSG_ENV)
            self.refused(dev(CARACAL_ENV=value), MSG_ENV)

    def test_known_accepted(self) -> None:
        """CARACAL_ENV=production and CARACAL_ENV=dev are accepted."""
        self.assertEqual(self.accepted(production()).env, "production")
        self.assertEqual(self.accepted(dev()).env, "dev")


class TLSRuleTests(ConfigTestMixin, SynchronousTestCase):
    """The TLS files come as a pair, or plaintext is asked for explicitly."""

    def test_only_one_file_refused(self) -> None:
        """A certificate without its key, or a key without its certificate, is refused."""
        for environ in (production, dev):
            self.refused(environ(TLS_CERT_FILE="/c.pem", TLS_KEY_FILE=None), MSG_TLS_PAIR)
            self.refused(environ(TLS_CERT_FILE=None, TLS_KEY_FILE="/k.pem"), MSG_TLS_PAIR)

    def test_only_one_file_refused_even_with_insecure_http(self) -> None:
        """Half a TLS pair is refused even when INSECURE_HTTP would allow plaintext."""
        self.refused(dev(TLS_CERT_FILE="/c.pem", INSECURE_HTTP="true"), MSG_TLS_PAIR)

    def test_neither_file_refused(self) -> None:
        """No TLS files are refused unless INSECURE_HTTP is true in dev."""
        self.refused(production(TLS_CERT_FILE=None, TLS_KEY_FILE=None), MSG_TLS_REQUIRED)
        self.refused(dev(INSECURE_HTTP=None), MSG_TLS_REQUIRED)
        self.refused(dev(INSECURE_HTTP="false"), MSG_TLS_REQUIRED)

    def test_both_files_accepted(self) -> None:
        """Both TLS files are accepted, and TLS is then enabled."""
        config = self.accepted(production())
        self.assertTrue(config.tls_enabled)
        config = self.accepted(dev(INSECURE_HTTP=None, TLS_CERT_FILE="/c", TLS_KEY_FILE="/k"))
        self.assertTrue(config.tls_enabled)
        self.assertFalse(config.insecure_http)

    def test_plaintext_in_dev_accepted(self) -> None:
        """Plaintext in dev is accepted and reported as the INSECURE_HTTP escape hatch."""
        config = self.accepted(dev())
        self.assertTrue(config.insecure_http)
        self.assertFalse(config.tls_enabled)
        self.assertEqual(config.escape_hatches(), ["INSECURE_HTTP"])


class EscapeHatchRuleTests(ConfigTestMixin, SynchronousTestCase):
    """INSECURE_HTTP, INSECURE_STS and JTI_FAIL_OPEN are dev-only."""

    def test_insecure_http_in_production_refused(self) -> None:
        """INSECURE_HTTP in production is refused, before any complaint about TLS files."""
        self.refused(production(INSECURE_HTTP="true"), MSG_INSECURE)
        # Without certificate files too: the production rule is what the
        # operator must hear about, not the missing files.
        self.refused(
            production(INSECURE_HTTP="1", TLS_CERT_FILE=None, TLS_KEY_FILE=None), MSG_INSECURE
        )

    def test_insecure_sts_in_production_refused(self) -> None:
        """INSECURE_STS in production is refused."""
        self.refused(production(INSECURE_STS="true"), MSG_INSECURE)
        self.refused(production(INSECURE_STS="T", STS_URL="http://sts:8080"), MSG_INSECURE)

    def test_explicit_false_in_production_accepted(self) -> None:
        """Escape hatches set explicitly to false are accepted in production."""
        config = self.accepted(
            production(INSECURE_HTTP="false", INSECURE_STS="0", JTI_FAIL_OPEN="False")
        )
        self.assertEqual(config.escape_hatches(), [])

    def test_jti_fail_open_in_production_refused(self) -> None:
        """JTI_FAIL_OPEN in production is refused."""
        self.refused(production(JTI_FAIL_OPEN="true"), MSG_JTI)

    def test_revocation_fail_open_in_production_refused(self) -> None:
        """REVOCATION_FAIL_OPEN=true is refused in production, with the SPEC's message."""
        self.refused(production(REVOCATION_FAIL_OPEN="true"), MSG_REVOCATION)
        self.refused(production(REVOCATION_FAIL_OPEN="1", CARACAL_ENV=None), MSG_REVOCATION)

    def test_revocation_fail_open_false_in_production_accepted(self) -> None:
        """An explicit false is no escape hatch and is accepted in production."""
        config = self.accepted(production(REVOCATION_FAIL_OPEN="false"))
        self.assertFalse(config.revocation_fail_open)
        self.assertEqual(config.escape_hatches(), [])

    def test_revocation_fail_open_in_dev_accepted(self) -> None:
        """In dev it is accepted, listed as an escape hatch and shown in the startup log."""
        config = self.accepted(dev(REVOCATION_FAIL_OPEN="true"))
        self.assertTrue(config.revocation_fail_open)
        self.assertIn("REVOCATION_FAIL_OPEN", config.escape_hatches())
        self.assertIs(config.redacted()["REVOCATION_FAIL_OPEN"], True)

    def test_escape_hatches_in_dev_accepted(self) -> None:
        """Every escape hatch is accepted in dev and listed, in order."""
        config = self.accepted(
            dev(
                INSECURE_STS="true",
                STS_URL="http://127.0.0.1:8080",
                JTI_FAIL_OPEN="true",
                ALLOW_PRIVATE_UPSTREAMS="true",
            )
        )
        self.assertTrue(config.insecure_http)
        self.assertTrue(config.insecure_sts)
        self.assertTrue(config.jti_fail_open)
        self.assertTrue(config.allow_private_upstreams)
        self.assertEqual(
            config.escape_hatches(),
            ["INSECURE_HTTP", "INSECURE_STS", "JTI_FAIL_OPEN", "ALLOW_PRIVATE_UPSTREAMS"],
        )


class PortRuleTests(ConfigTestMixin, SynchronousTestCase):
    """Production listens on 8081 only."""

    def test_other_port_in_production_refused(self) -> None:
        """A PORT other than 8081 is refused in production."""
        for port in ("8080", "443", "18081"):
            self.refused(production(PORT=port), MSG_PORT)

    def test_8081_in_production_accepted(self) -> None:
        """PORT=8081 is accepted in production."""
        self.assertEqual(self.accepted(production(PORT="8081")).port, 8081)

    def test_other_port_in_dev_accepted(self) -> None:
        """Any valid PORT is accepted in dev."""
        self.assertEqual(self.accepted(dev(PORT="18443")).port, 18443)

    def test_malformed_port_refused(self) -> None:
        """A PORT that is not a plain decimal integer from 1 to 65535 is refused."""
        for environ in (production, dev):
            self.refused(environ(PORT="http"), "PORT must be an integer")
            self.refused(environ(PORT="80.5"), "PORT must be an integer")
            self.refused(environ(PORT="0"), "PORT must be between 1 and 65535")
            self.refused(environ(PORT="65536"), "PORT must be between 1 and 65535")
            self.refused(environ(PORT="-1"), "PORT must be between 1 and 65535")
            for lax in ("8_081", "+8081", "\uff18\uff10\uff18\uff11", " 80 81"):
                self.refused(environ(PORT=lax), "PORT must be an integer")


class HMACKeyRuleTests(ConfigTestMixin, SynchronousTestCase):
    """STREAMS_HMAC_KEY: required in production; when set, hex and >= 32 bytes."""

    def test_missing_in_production_refused(self) -> None:
        """A missing or empty STREAMS_HMAC_KEY is refused in production."""
        self.refused(production(STREAMS_HMAC_KEY=None), MSG_HMAC_REQUIRED)
        self.refused(production(STREAMS_HMAC_KEY=""), MSG_HMAC_REQUIRED)

    def test_missing_in_dev_accepted(self) -> None:
        """Dev runs without STREAMS_HMAC_KEY."""
        self.assertIsNone(self.accepted(dev()).streams_hmac_key)

    def test_malformed_refused(self) -> None:
        """A STREAMS_HMAC_KEY that is not at least 32 bytes of hex is refused."""
        for environ in (production, dev):
            for value in ("zz" * 32, "a1" * 31, "a1" * 32 + "a", "not hex at all", "a1 " * 32):
                self.refused(environ(STREAMS_HMAC_KEY=value), MSG_HMAC_FORMAT)

    def test_message_hides_the_key(self) -> None:
        """The refusal of a malformed key does not repeat the key."""
        bad = "secretsecret" * 6
        error = self.assertRaises(
            ConfigError, GatewayConfig.from_environ, dev(STREAMS_HMAC_KEY=bad)
        )
        self.assertNotIn(bad, str(error))

    def test_accepted(self) -> None:
        """A hex STREAMS_HMAC_KEY of either case is decoded into bytes."""
        self.assertEqual(self.accepted(production()).streams_hmac_key, bytes.fromhex(HMAC_KEY_HEX))
        config = self.accepted(dev(STREAMS_HMAC_KEY="AB" * 48))
        self.assertEqual(config.streams_hmac_key, b"\xab" * 48)


class AllowlistRuleTests(ConfigTestMixin, SynchronousTestCase):
    """Private upstreams in production need an explicit host allowlist."""

    def test_private_without_allowlist_in_production_refused(self) -> None:
        """Private upstreams in production without a non-empty allow-list are refused."""
        self.refused(production(ALLOW_PRIVATE_UPSTREAMS="true"), MSG_ALLOWLIST)
        self.refused(
            production(ALLOW_PRIVATE_UPSTREAMS="true", UPSTREAM_HOST_ALLOWLIST=" , ,"),
            MSG_ALLOWLIST,
        )

    def test_private_with_allowlist_in_production_accepted(self) -> None:
        """
        Private upstreams with an allow-list are accepted; the hosts are lower-cased, trimmed and
        dot-stripped.
        """
        config = self.accepted(
            production(
                ALLOW_PRIVATE_UPSTREAMS="true",
                UPSTREAM_HOST_ALLOWLIST="API.internal.example.com, payments.internal.example.com.,",
            )
        )
        self.assertTrue(config.allow_private_upstreams)
        self.assertEqual(
            config.upstream_host_allowlist,
            frozenset({"api.internal.example.com", "payments.internal.example.com"}),
        )
        self.assertEqual(config.escape_hatches(), ["ALLOW_PRIVATE_UPSTREAMS"])

    def test_private_without_allowlist_in_dev_accepted(self) -> None:
        """Dev allows private upstreams without an allow-list."""
        config = self.accepted(dev(ALLOW_PRIVATE_UPSTREAMS="true"))
        self.assertTrue(config.allow_private_upstreams)
        self.assertEqual(config.upstream_host_allowlist, frozenset())

    def test_allowlist_without_private_accepted(self) -> None:
        """An allow-list alone is accepted and does not allow private upstreams."""
        config = self.accepted(production(UPSTREAM_HOST_ALLOWLIST="tools.example.com"))
        self.assertFalse(config.allow_private_upstreams)
        self.assertEqual(config.upstream_host_allowlist, frozenset({"tools.example.com"}))


class STSURLRuleTests(ConfigTestMixin, SynchronousTestCase):
    """STS_URL: required, absolute, https unless INSECURE_STS."""

    def test_http_without_insecure_sts_refused(self) -> None:
        """A plaintext STS_URL is refused unless INSECURE_STS is true."""
        self.refused(production(STS_URL="http://sts.example.com"), MSG_STS_HTTPS)
        self.refused(dev(STS_URL="http://127.0.0.1:8080"), MSG_STS_HTTPS)
        self.refused(dev(STS_URL="http://127.0.0.1:8080", INSECURE_STS="false"), MSG_STS_HTTPS)

    def test_http_with_insecure_sts_in_dev_accepted(self) -> None:
        """
        A plaintext STS_URL with INSECURE_STS in dev is accepted, its base URL without the slash.
        """
        config = self.accepted(dev(STS_URL="http://127.0.0.1:8080/", INSECURE_STS="true"))
        self.assertEqual(config.sts_url, "http://127.0.0.1:8080/")
        self.assertEqual(config.sts_base_url, "http://127.0.0.1:8080")

    def test_https_accepted(self) -> None:
        """An https STS_URL is accepted as given."""
        self.assertEqual(
            self.accepted(production()).sts_url,
            "https://sts.example.com/",
        )

    def test_missing_refused(self) -> None:
        """A missing STS_URL is refused."""
        for environ in (production, dev):
            self.refused(environ(STS_URL=None), "STS_URL is required")

    def test_not_absolute_refused(self) -> None:
        """An STS_URL that is not an absolute http(s) URL with a valid port is refused."""
        message = "STS_URL must be an absolute http(s) URL"
        for value in ("sts.example.com", "/oauth", "ftp://sts.example.com", "https://"):
            self.refused(production(STS_URL=value), message)
        self.refused(production(STS_URL="https://sts.example.com:99999"), message)


class RequiredURLTests(ConfigTestMixin, SynchronousTestCase):
    """DATABASE_URL and REDIS_URL are required; REDIS_URL must parse."""

    def test_database_url_missing(self) -> None:
        """A missing DATABASE_URL is refused."""
        for environ in (production, dev):
            self.refused(environ(DATABASE_URL=None), "DATABASE_URL is required")

    def test_redis_url_missing(self) -> None:
        """A missing REDIS_URL is refused."""
        for environ in (production, dev):
            self.refused(environ(REDIS_URL=None), "REDIS_URL is required")

    def test_database_dsn_accepted(self) -> None:
        """A libpq key=value DSN is accepted as DATABASE_URL."""
        config = self.accepted(dev(DATABASE_URL="host=127.0.0.1 dbname=test user=root"))
        self.assertEqual(config.database_url, "host=127.0.0.1 dbname=test user=root")

    def test_redis_url_malformed(self) -> None:
        """A malformed REDIS_URL is refused as such."""
        for value in (
            "http://127.0.0.1:6379",
            "redis://",
            "redis://127.0.0.1:port",
            "redis://127.0.0.1:6379/zero",
        ):
            error = self.assertRaises(ConfigError, GatewayConfig.from_environ, dev(REDIS_URL=value))
            self.assertTrue(str(error).startswith("REDIS_URL is malformed: "), str(error))

    def test_redis_url_error_hides_the_password(self) -> None:
        """The refusal of a malformed REDIS_URL does not repeat its password."""
        error = self.assertRaises(
            ConfigError,
            GatewayConfig.from_environ,
            dev(REDIS_URL=f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/db"),
        )
        self.assertNotIn(REDIS_PASSWORD, str(error))

    def test_redis_property(self) -> None:
        """The configuration's Redis address is parsed from REDIS_URL."""
        config = self.accepted(production())
        self.assertEqual(
            config.redis,
            RedisAddress(
                host="redis.example.com", port=6380, db=2, password=REDIS_PASSWORD, tls=False
            ),
        )


class SecretFileTests(ConfigTestMixin, SynchronousTestCase):
    """
    C{<NAME>_FILE} (SPEC 16): a secret read from the file it names, one
    trailing newline stripped; both forms set, or an unreadable file, refused.
    """

    def secret_file(self, content: bytes | str) -> str:
        """A file holding C{content}; returns its path."""
        path = self.mktemp()
        with open(path, "wb") as output:
            output.write(content.encode() if isinstance(content, str) else content)
        return path

    def test_database_url_from_file(self) -> None:
        """DATABASE_URL_FILE's content is the DATABASE_URL, without the final newline."""
        url = f"postgresql://gateway:{DATABASE_PASSWORD}@db.example.com:5432/caracal"
        config = self.accepted(
            production(DATABASE_URL=None, DATABASE_URL_FILE=self.secret_file(url + "\n"))
        )
        self.assertEqual(config.database_url, url)

    def test_redis_url_from_file(self) -> None:
        """REDIS_URL_FILE's content is parsed like REDIS_URL (no newline: printf)."""
        url = f"redis://:{REDIS_PASSWORD}@redis.example.com:6380/2"
        config = self.accepted(production(REDIS_URL=None, REDIS_URL_FILE=self.secret_file(url)))
        self.assertEqual(config.redis_url, url)
        self.assertEqual(config.redis.password, REDIS_PASSWORD)

    def test_streams_hmac_key_from_file(self) -> None:
        """STREAMS_HMAC_KEY_FILE satisfies the production rule and is checked the same way."""
        path = self.secret_file(HMAC_KEY_HEX + "\r\n")
        config = self.accepted(production(STREAMS_HMAC_KEY=None, STREAMS_HMAC_KEY_FILE=path))
        self.assertEqual(config.streams_hmac_key, bytes.fromhex(HMAC_KEY_HEX))
        short = self.secret_file("abcd\n")
        self.refused(
            production(STREAMS_HMAC_KEY=None, STREAMS_HMAC_KEY_FILE=short), MSG_HMAC_FORMAT
        )

    def test_metrics_bearer_from_file(self) -> None:
        """METRICS_BEARER_FILE is honoured by the one reader every variable goes through."""
        path = self.secret_file("metrics-bearer-value\n")
        self.assertEqual(
            read_secret({"METRICS_BEARER_FILE": path}, "METRICS_BEARER"), "metrics-bearer-value"
        )

    def test_only_one_trailing_newline_stripped(self) -> None:
        """The file's content is the value: one final newline goes, nothing else."""
        path = self.secret_file(" pass word \n\n")
        self.assertEqual(
            read_secret({"METRICS_BEARER_FILE": path}, "METRICS_BEARER"), " pass word \n"
        )

    def test_plain_variable_still_read(self) -> None:
        """Without the _FILE form the variable itself is the value."""
        self.assertEqual(read_secret({"REDIS_URL": "redis://r"}, "REDIS_URL"), "redis://r")
        self.assertIsNone(read_secret({"REDIS_URL_FILE": ""}, "REDIS_URL"))

    def test_other_variables_have_no_file_form(self) -> None:
        """Only the secrets take a _FILE form; STS_URL_FILE means nothing."""
        path = self.secret_file("https://elsewhere.example.com")
        config = self.accepted(production(STS_URL_FILE=path))
        self.assertEqual(config.sts_url, "https://sts.example.com/")

    def test_both_forms_refused(self) -> None:
        """Each secret set both ways: the exact SPEC message, for every variable."""
        path = self.secret_file("anything\n")
        for name in ("DATABASE_URL", "REDIS_URL", "STREAMS_HMAC_KEY"):
            self.refused(
                production(**{f"{name}_FILE": path}),
                f"{name} and {name}_FILE are mutually exclusive",
            )
        error = self.assertRaises(
            ConfigError,
            read_secret,
            {"METRICS_BEARER": "x", "METRICS_BEARER_FILE": path},
            "METRICS_BEARER",
        )
        self.assertEqual(
            str(error), "METRICS_BEARER and METRICS_BEARER_FILE are mutually exclusive"
        )

    def test_unreadable_file_refused(self) -> None:
        """A missing file or a directory: a message naming the file and why."""
        missing = self.mktemp()
        directory = self.mktemp()
        os.mkdir(directory)
        for name in ("DATABASE_URL", "REDIS_URL", "STREAMS_HMAC_KEY"):
            for path, reason in (
                (missing, "No such file or directory"),
                (directory, "Is a directory"),
            ):
                self.refused(
                    production(**{name: None, f"{name}_FILE": path}),
                    f"{name}_FILE: cannot read {path}: {reason}",
                )

    def test_unreadable_metrics_bearer_file_refused(self) -> None:
        """METRICS_BEARER_FILE naming nothing readable is refused like the others."""
        missing = self.mktemp()
        error = self.assertRaises(
            ConfigError, read_secret, {"METRICS_BEARER_FILE": missing}, "METRICS_BEARER"
        )
        self.assertEqual(
            str(error), f"METRICS_BEARER_FILE: cannot read {missing}: No such file or directory"
        )

    def test_empty_or_binary_file_refused_without_content(self) -> None:
        """An empty file, or one that is not text, is refused naming the file, not its bytes."""
        empty = self.secret_file("\n")
        self.refused(
            production(DATABASE_URL=None, DATABASE_URL_FILE=empty),
            f"DATABASE_URL_FILE: {empty} is empty",
        )
        binary = self.secret_file(b"\xff\xfesecret-bytes")
        error = self.assertRaises(
            ConfigError,
            GatewayConfig.from_environ,
            production(REDIS_URL=None, REDIS_URL_FILE=binary),
        )
        self.assertEqual(str(error), f"REDIS_URL_FILE: {binary} is not UTF-8 text")

    def test_malformed_secret_from_file_not_echoed(self) -> None:
        """A file whose content is refused does not show that content in the message."""
        path = self.secret_file(f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/db\n")
        error = self.assertRaises(
            ConfigError,
            GatewayConfig.from_environ,
            production(REDIS_URL=None, REDIS_URL_FILE=path),
        )
        self.assertNotIn(REDIS_PASSWORD, str(error))
        self.assertTrue(str(error).startswith("REDIS_URL is malformed"), str(error))


class SentinelURLTests(ConfigTestMixin, SynchronousTestCase):
    """
    C{redis+sentinel://[:password@]host:port[,host:port...]/<master>[/<db>]}
    (SPEC 16) and the multi-host forms of C{DATABASE_URL}.
    """

    def test_sentinels_master_and_db(self) -> None:
        """Every sentinel kept in order, the master's name, the database and password."""
        address = parse_redis_url(
            f"redis+sentinel://:{REDIS_PASSWORD}@s1.example.com:26379,s2.example.com:26380,"
            "[::1]/caracal-main/3"
        )
        self.assertEqual(
            address.sentinels,
            (("s1.example.com", 26379), ("s2.example.com", 26380), ("::1", 26379)),
        )
        self.assertEqual(address.master_name, "caracal-main")
        self.assertEqual(address.db, 3)
        self.assertEqual(address.password, REDIS_PASSWORD)
        self.assertEqual((address.host, address.port), ("s1.example.com", 26379))
        self.assertFalse(address.tls)

    def test_one_sentinel_no_db_no_password(self) -> None:
        """The smallest form: one sentinel, a master name; database 0."""
        address = parse_redis_url("redis+sentinel://127.0.0.1:26379/mymaster")
        self.assertEqual(address.sentinels, (("127.0.0.1", 26379),))
        self.assertEqual((address.master_name, address.db, address.password), ("mymaster", 0, None))
        self.assertEqual(parse_redis_url("redis+sentinel://h:1/m/").db, 0)

    def test_plain_url_has_no_sentinels(self) -> None:
        """redis:// keeps meaning one server."""
        address = parse_redis_url("redis://127.0.0.1:6379/0")
        self.assertEqual((address.sentinels, address.master_name), ((), None))

    def test_malformed(self) -> None:
        """No host, no master name, a bad port, a non-numeric db, extra parts: refused."""
        for value in (
            "redis+sentinel:///mymaster",
            "redis+sentinel://h:26379",
            "redis+sentinel://h:26379/",
            "redis+sentinel://h:port/m",
            "redis+sentinel://h:1/m/db",
            "redis+sentinel://h:1/m/0/extra",
            "redis+sentinel://h:1/m?x=1",
        ):
            self.assertRaises(ValueError, parse_redis_url, value)

    def test_accepted_as_redis_url(self) -> None:
        """The gateway's configuration takes a sentinel URL."""
        config = self.accepted(production(REDIS_URL="redis+sentinel://s1:26379,s2:26379/m"))
        self.assertEqual(config.redis.master_name, "m")

    def test_sentinel_url_redacted(self) -> None:
        """The startup log shows every sentinel, never the password."""
        url = f"redis+sentinel://:{REDIS_PASSWORD}@s1:26379,s2:26379/m/1"
        self.assertEqual(redact_url(url), "redis+sentinel://:***@s1:26379,s2:26379/m/1")

    def test_multi_host_database_urls_accepted(self) -> None:
        """libpq's multi-host DSN and URL forms pass startup validation."""
        for dsn in (
            "host=pg1,pg2 port=5432,5433 dbname=caracal target_session_attrs=read-write",
            "postgresql://pg1:5432,pg2:5433/caracal?target_session_attrs=read-write",
        ):
            self.assertEqual(self.accepted(production(DATABASE_URL=dsn)).database_url, dsn)

    def test_multi_host_database_url_redacted(self) -> None:
        """A multi-host URL keeps its hosts in the log; its password does not show."""
        url = (
            f"postgresql://gateway:{DATABASE_PASSWORD}@pg1:5432,pg2:5433/caracal"
            "?target_session_attrs=read-write"
        )
        self.assertEqual(
            redact_url(url),
            "postgresql://gateway:***@pg1:5432,pg2:5433/caracal?target_session_attrs=read-write",
        )
        dsn = f"host=pg1,pg2 password={DATABASE_PASSWORD} target_session_attrs=read-write"
        self.assertEqual(
            redact_url(dsn), "host=pg1,pg2 password=*** target_session_attrs=read-write"
        )


class RedisURLTests(SynchronousTestCase):
    """L{parse_redis_url} reads C{redis://[:password@]host[:port][/db]}."""

    def test_defaults(self) -> None:
        """A bare redis URL means port 6379, database 0, no password, no TLS."""
        self.assertEqual(
            parse_redis_url("redis://127.0.0.1"),
            RedisAddress(host="127.0.0.1", port=6379, db=0, password=None, tls=False),
        )

    def test_full(self) -> None:
        """A rediss URL gives TLS, host, port, database and the percent-decoded password."""
        address = parse_redis_url("rediss://:p%40ss%3Aword@cache.example.com:6390/15")
        self.assertEqual(
            address,
            RedisAddress(
                host="cache.example.com", port=6390, db=15, password="p@ss:word", tls=True
            ),
        )

    def test_trailing_slash_is_db_zero(self) -> None:
        """A trailing slash without a number is database 0."""
        self.assertEqual(parse_redis_url("redis://h:1/").db, 0)

    def test_user_and_password(self) -> None:
        """A username (Redis 6 ACL form) is tolerated; the password is kept."""
        self.assertEqual(parse_redis_url("redis://default:pw@h").password, "pw")

    def test_empty_password_is_none(self) -> None:
        """An empty password is no password."""
        self.assertIsNone(parse_redis_url("redis://:@h").password)

    def test_ipv6(self) -> None:
        """A bracketed IPv6 host is read without its brackets."""
        address = parse_redis_url("redis://[::1]:6379/1")
        self.assertEqual((address.host, address.port, address.db), ("::1", 6379, 1))

    def test_malformed(self) -> None:
        """Other schemes, a missing host, a non-numeric port or database are refused."""
        for value in ("unix:///tmp/redis.sock", "redis://", "redis://h:x", "redis://h/a"):
            self.assertRaises(ValueError, parse_redis_url, value)

    def test_repr_hides_password(self) -> None:
        """The address's repr does not show the password."""
        self.assertNotIn("hunter2", repr(parse_redis_url("redis://:hunter2@h")))


class BooleanTests(ConfigTestMixin, SynchronousTestCase):
    """Booleans take Go's C{strconv.ParseBool} spellings, nothing else."""

    def test_spellings(self) -> None:
        """The boolean spellings Go's strconv.ParseBool accepts are read."""
        for text in ("1", "t", "T", "TRUE", "true", "True"):
            self.assertIs(parse_bool(text), True, text)
        for text in ("0", "f", "F", "FALSE", "false", "False"):
            self.assertIs(parse_bool(text), False, text)

    def test_other_spellings_refused(self) -> None:
        """Any other spelling of a boolean is refused."""
        for text in ("yes", "no", "on", "off", "tRUE", "fAlse", "2", "", "y"):
            self.assertRaises(ValueError, parse_bool, text)

    def test_malformed_names_the_variable(self) -> None:
        """A malformed boolean is refused, naming its variable."""
        for name in BOOLEANS:
            self.refused(dev(**{name: "yes"}), f"{name} must be a boolean (true or false)")
            self.refused(production(**{name: "on"}), f"{name} must be a boolean (true or false)")

    def test_every_spelling_in_the_environment(self) -> None:
        """Every accepted spelling works for a variable read from the environment."""
        for text in ("1", "t", "T", "TRUE", "true", "True"):
            self.assertTrue(self.accepted(dev(JTI_FAIL_OPEN=text)).jti_fail_open, text)
        for text in ("0", "f", "F", "FALSE", "false", "False"):
            self.assertFalse(self.accepted(production(JTI_FAIL_OPEN=text)).jti_fail_open, text)


class DurationTests(ConfigTestMixin, SynchronousTestCase):
    """Durations take Go's C{time.ParseDuration} syntax."""

    def test_go_syntax(self) -> None:
        """Durations in Go's syntax are read as seconds."""
        cases = {
            "250ms": 0.25,
            "5s": 5.0,
            "1m30s": 90.0,
            "1h": 3600.0,
            ".5s": 0.5,
            "1.5h": 5400.0,
            "2h45m10s": 9910.0,
            "1.s": 1.0,
            "0": 0.0,
            "0s": 0.0,
            "+5s": 5.0,
            "100us": 0.0001,
            "100\u00b5s": 0.0001,
            "1500ns": 0.0000015,
            "1m0.25s": 60.25,
        }
        for text, seconds in cases.items():
            self.assertAlmostEqual(parse_duration(text), seconds, places=9, msg=text)

    def test_malformed(self) -> None:
        """Durations without a unit, negative, spaced or in unknown units are refused."""
        for text in ("5", "1.5", "", "s", "-5s", "5 s", "1sm", "5S", "1d", "five seconds", "."):
            self.assertRaises(ValueError, parse_duration, text)

    def test_every_variable(self) -> None:
        """Every duration variable is read into its attribute."""
        for name, (attribute, _default) in DURATIONS.items():
            config = self.accepted(production(**{name: "1m30s"}))
            self.assertEqual(getattr(config, attribute), 90.0, name)
            config = self.accepted(dev(**{name: "250ms"}))
            self.assertEqual(getattr(config, attribute), 0.25, name)

    def test_malformed_names_the_variable(self) -> None:
        """A malformed duration is refused, naming its variable."""
        for name in DURATIONS:
            message = f"{name} must be a duration such as 250ms, 5s or 1m30s"
            self.refused(production(**{name: "30"}), message)
            self.refused(dev(**{name: "soon"}), message)

    def test_zero_refused(self) -> None:
        """A zero timeout would mean none at all; the gateway refuses it."""
        for name in DURATIONS:
            self.refused(dev(**{name: "0s"}), f"{name} must be a positive duration")


class OtherValueTests(ConfigTestMixin, SynchronousTestCase):
    """MAX_REQUEST_BYTES and LOG_LEVEL."""

    def test_max_request_bytes(self) -> None:
        """MAX_REQUEST_BYTES must be a positive integer."""
        self.assertEqual(self.accepted(dev(MAX_REQUEST_BYTES="1")).max_request_bytes, 1)
        self.refused(dev(MAX_REQUEST_BYTES="10MB"), "MAX_REQUEST_BYTES must be an integer")
        self.refused(dev(MAX_REQUEST_BYTES="0"), f"MAX_REQUEST_BYTES must be between 1 and {2**62}")

    def test_max_token_lifetime(self) -> None:
        """MAX_TOKEN_LIFETIME (SPEC 12 H6): a Go duration, 24 h by default."""
        self.assertEqual(self.accepted(dev()).max_token_lifetime, 86400.0)
        self.assertEqual(self.accepted(dev(MAX_TOKEN_LIFETIME="1h30m")).max_token_lifetime, 5400.0)
        self.refused(
            dev(MAX_TOKEN_LIFETIME="1d"),
            "MAX_TOKEN_LIFETIME must be a duration such as 250ms, 5s or 1m30s",
        )
        self.refused(dev(MAX_TOKEN_LIFETIME="0"), "MAX_TOKEN_LIFETIME must be a positive duration")

    def test_max_connections(self) -> None:
        """MAX_CONNECTIONS (SPEC 12 H8): a positive integer, 10000 by default."""
        self.assertEqual(self.accepted(dev()).max_connections, 10000)
        self.assertEqual(self.accepted(dev(MAX_CONNECTIONS="64")).max_connections, 64)
        self.refused(dev(MAX_CONNECTIONS="lots"), "MAX_CONNECTIONS must be an integer")
        self.refused(dev(MAX_CONNECTIONS="0"), f"MAX_CONNECTIONS must be between 1 and {10**7}")

    def test_log_level(self) -> None:
        """LOG_LEVEL is one of four levels, in any case."""
        for level in ("debug", "info", "warn", "error", "WARN", "Info"):
            self.assertEqual(self.accepted(dev(LOG_LEVEL=level)).log_level, level.lower())
        for level in ("warning", "trace", "verbose"):
            self.refused(dev(LOG_LEVEL=level), "LOG_LEVEL must be one of debug, info, warn, error")


class RedactionTests(ConfigTestMixin, SynchronousTestCase):
    """Secrets never leave the configuration object in clear."""

    def test_redacted_hides_secrets(self) -> None:
        """The redacted configuration shows no password nor the HMAC key."""
        config = self.accepted(production())
        redacted = config.redacted()
        text = json.dumps(redacted)
        for secret in (DATABASE_PASSWORD, REDIS_PASSWORD, HMAC_KEY_HEX):
            self.assertNotIn(secret, text)
        self.assertEqual(redacted["STREAMS_HMAC_KEY"], "***")
        self.assertEqual(
            redacted["DATABASE_URL"], "postgresql://gateway:***@db.example.com:5432/caracal"
        )
        self.assertEqual(redacted["REDIS_URL"], "redis://:***@redis.example.com:6380/2")

    def test_sts_url_credentials_query_fragment_refused(self) -> None:
        """Paths are appended to STS_URL and the startup log prints it."""
        for url in (
            "https://client:sts-pw-123@sts.example.com",
            "https://sts.example.com/?token=abc",
            "https://sts.example.com/#frag",
        ):
            self.refused(
                production(STS_URL=url), "STS_URL must not carry credentials, a query or a fragment"
            )

    def test_malformed_database_url_refused_at_startup(self) -> None:
        """Refused with the other startup rules, not later by the store with a traceback."""
        for dsn in ("host=127.0.0.1 dbname", "mysql://x", "postgresql://[bad"):
            self.refused(
                production(DATABASE_URL=dsn), "DATABASE_URL is not a valid Postgres URL or DSN"
            )

    def test_non_ascii_duration_digits_refused(self) -> None:
        """A duration written with non-ASCII digits is refused."""
        self.refused(
            dev(STS_TIMEOUT="\uff15s"), "STS_TIMEOUT must be a duration such as 250ms, 5s or 1m30s"
        )

    def test_insecure_http_wins_over_tls_files(self) -> None:
        """INSECURE_HTTP in dev disables TLS even when TLS files are given."""
        config = self.accepted(
            dev(INSECURE_HTTP="true", TLS_CERT_FILE="/tls/gw.crt", TLS_KEY_FILE="/tls/gw.key")
        )
        self.assertTrue(config.tls_cert_file)
        self.assertFalse(config.tls_enabled)

    def test_redacted_shows_the_rest(self) -> None:
        """The redacted configuration shows every setting that is not a secret."""
        config = self.accepted(production(UPSTREAM_HOST_ALLOWLIST="b.example,a.example"))
        redacted = config.redacted()
        self.assertEqual(redacted["CARACAL_ENV"], "production")
        self.assertEqual(redacted["PORT"], 8081)
        self.assertEqual(redacted["BIND_ADDRESS"], "*")
        self.assertEqual(redacted["TLS_CERT_FILE"], "/etc/caracal/tls/server.crt")
        self.assertEqual(redacted["UPSTREAM_HOST_ALLOWLIST"], ["a.example", "b.example"])
        self.assertEqual(redacted["STS_TIMEOUT"], 5.0)
        self.assertEqual(redacted["LOG_LEVEL"], "info")

    def test_no_hmac_key(self) -> None:
        """Without an HMAC key the redacted configuration shows none."""
        self.assertIsNone(self.accepted(dev()).redacted()["STREAMS_HMAC_KEY"])

    def test_dsn_password_redacted(self) -> None:
        """The password of a key=value DSN is redacted."""
        config = self.accepted(
            dev(DATABASE_URL="host=db dbname=caracal user=gw password=dsn-s3cret")
        )
        self.assertEqual(
            config.redacted()["DATABASE_URL"], "host=db dbname=caracal user=gw password=***"
        )

    def test_url_without_password_unchanged(self) -> None:
        """A URL without a password is not changed by redaction."""
        self.assertEqual(
            redact_url("postgresql://root@127.0.0.1/test"), "postgresql://root@127.0.0.1/test"
        )
        self.assertEqual(redact_url("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0")

    def test_repr_hides_secrets(self) -> None:
        """The configuration's repr shows no password nor the HMAC key."""
        text = repr(self.accepted(production()))
        for secret in (DATABASE_PASSWORD, REDIS_PASSWORD, HMAC_KEY_HEX, "a1a1"):
            self.assertNotIn(secret, text)

    def test_quoted_dsn_password_redacted(self) -> None:
        """libpq allows a quoted password with spaces; none of it may show."""
        redacted = redact_url("host=db password='two words' dbname=caracal")
        self.assertNotIn("two", redacted)
        self.assertNotIn("words", redacted)

    def test_query_password_redacted_with_userinfo(self) -> None:
        """A password in the query string is hidden even when userinfo has one."""
        redacted = redact_url("postgresql://u:pw@db/caracal?password=query-s3cret")
        self.assertNotIn("query-s3cret", redacted)

    def test_escaped_space_in_unquoted_dsn_password(self) -> None:
        """
        libpq reads C{password=a\\ b} as one value (the backslash escapes the
        blank): none of it may show, and the next keyword is kept.
        """
        redacted = redact_url("host=db password=lead\\ tail user=gw")
        self.assertEqual(redacted, "host=db password=*** user=gw")

    def test_escaped_space_in_quoted_dsn_password(self) -> None:
        """A quoted password with an escaped blank and an escaped quote is hidden whole."""
        for dsn in (
            "host=db password='lead\\ tail' user=gw",
            "host=db password = 'lead\\'s tail' user=gw",
            "host=db sslpassword='lead\\\\' user=gw password='x\\ tail'",
        ):
            redacted = redact_url(dsn)
            self.assertNotIn("lead", redacted, dsn)
            self.assertNotIn("tail", redacted, dsn)
            self.assertTrue(redacted.startswith("host=db "), redacted)
            self.assertIn("user=gw", redacted)

    def test_startup_log_value_of_escaped_dsn(self) -> None:
        """The configuration the startup log prints hides an escaped DSN password whole."""
        config = self.accepted(dev(DATABASE_URL="host=db dbname=caracal password='pw\\ rest'"))
        shown = config.redacted()["DATABASE_URL"]
        self.assertEqual(shown, "host=db dbname=caracal password=***")

    def test_unparseable_dsn_hidden_whole(self) -> None:
        """A DSN that cannot be split as libpq would is not shown at all."""
        self.assertEqual(redact_url("host=db password='never closed"), "***")
        self.assertEqual(redact_url("host=db password"), "***")

    def test_url_password_with_delimiters(self) -> None:
        """
        libpq ends the userinfo at the first C{@}, Python's urlsplit at the
        first C{#} or C{?}: a password holding either is hidden under both
        readings; one with a raw C{/} (which libpq refuses) hides the URL.
        """
        self.assertEqual(
            redact_url("postgresql://gw:12#34@db/caracal"), "postgresql://gw:***@db/caracal"
        )
        self.assertEqual(redact_url("redis://:pw?x@redis:6379/0"), "redis://:***@redis:6379/0")
        self.assertEqual(redact_url("postgresql://gw:p/w@db/caracal"), "***")

    def test_url_query_secret_names_any_case_or_encoding(self) -> None:
        """libpq percent-decodes query names: C{pass%77ord} is C{password}."""
        redacted = redact_url(
            "postgresql://db/caracal?user=gw&Pass%77ord=q-s3cret&sslpassword=k-s3cret&sslmode=require"
        )
        self.assertEqual(
            redacted,
            "postgresql://db/caracal?user=gw&Pass%77ord=***&sslpassword=***&sslmode=require",
        )

    def test_multi_host_url(self) -> None:
        """A libpq multi-host URL keeps its hosts and loses its password."""
        self.assertEqual(
            redact_url("postgresql://gw:pw-s3cret@pg1:5432,pg2:5432/caracal"),
            "postgresql://gw:***@pg1:5432,pg2:5432/caracal",
        )

    def test_redis_url_with_user_and_password(self) -> None:
        """An ACL user stays, its password goes."""
        self.assertEqual(
            redact_url("rediss://gateway:r-s3cret@redis:6380/1"),
            "rediss://gateway:***@redis:6380/1",
        )


class AgentClientSettingsTests(ConfigTestMixin, SynchronousTestCase):
    """SPEC 13: stream timers, RFC 9728 discovery and CORS settings."""

    def test_defaults(self) -> None:
        """Unset, the stream timers take 5m and 15s; no discovery, no CORS."""
        config = self.accepted(production())
        self.assertEqual(config.stream_idle_timeout, 300.0)
        self.assertEqual(config.sse_keepalive, 15.0)
        self.assertIsNone(config.public_url)
        self.assertIsNone(config.resource_metadata_url)
        self.assertEqual(config.authorization_servers, ("https://sts.example.com/",))
        self.assertEqual(config.cors_allowed_origins, frozenset())

    def test_stream_timers(self) -> None:
        """Both timers take Go durations; SSE_KEEPALIVE=0 turns keep-alives off."""
        config = self.accepted(dev(STREAM_IDLE_TIMEOUT="1m30s", SSE_KEEPALIVE="200ms"))
        self.assertEqual(config.stream_idle_timeout, 90.0)
        self.assertEqual(config.sse_keepalive, 0.2)
        self.assertEqual(self.accepted(dev(SSE_KEEPALIVE="0")).sse_keepalive, 0.0)

    def test_stream_timers_malformed(self) -> None:
        """A malformed or zero idle timeout, a malformed keep-alive: refused, named."""
        self.refused(
            dev(STREAM_IDLE_TIMEOUT="0"), "STREAM_IDLE_TIMEOUT must be a positive duration"
        )
        self.refused(
            dev(STREAM_IDLE_TIMEOUT="soon"),
            "STREAM_IDLE_TIMEOUT must be a duration such as 250ms, 5s or 1m30s",
        )
        self.refused(
            dev(SSE_KEEPALIVE="-1s"),
            "SSE_KEEPALIVE must be a duration such as 250ms, 5s or 1m30s (0 turns it off)",
        )

    def test_public_url(self) -> None:
        """PUBLIC_URL is kept without its trailing slash; the metadata URL derives from it."""
        config = self.accepted(production(PUBLIC_URL="https://gw.example.com:8443/"))
        self.assertEqual(config.public_url, "https://gw.example.com:8443")
        self.assertEqual(
            config.resource_metadata_url,
            "https://gw.example.com:8443/.well-known/oauth-protected-resource",
        )
        self.assertEqual(config.redacted()["PUBLIC_URL"], "https://gw.example.com:8443")

    def test_public_url_refused(self) -> None:
        """PUBLIC_URL must be an absolute https URL of the root, even in dev."""
        root = (
            "PUBLIC_URL must be an absolute https URL of the gateway's root,"
            " such as https://gateway.example.com"
        )
        shape = "PUBLIC_URL must hold absolute URLs without credentials, query or fragment"
        for value, message in [
            ("http://gw.example.com", root),
            ("https://gw.example.com/mcp", root),
            ("gw.example.com", shape),
            ("https://", shape),
            ("https://user:pw@gw.example.com", shape),
            ("https://gw.example.com/?a=1", shape),
            ("https://gw.example.com/#x", shape),
            ("https://gw.example.com:99999", shape),
        ]:
            self.refused(dev(PUBLIC_URL=value), message)

    def test_authorization_servers(self) -> None:
        """A comma-separated list, in order; each must be an absolute http(s) URL."""
        config = self.accepted(
            dev(AUTHORIZATION_SERVERS=" https://as1.example.com , https://as2.example.com/t")
        )
        self.assertEqual(
            config.authorization_servers, ("https://as1.example.com", "https://as2.example.com/t")
        )
        self.refused(
            dev(AUTHORIZATION_SERVERS="ftp://as.example.com"),
            "AUTHORIZATION_SERVERS must list absolute http(s) URLs",
        )

    def test_cors_origins(self) -> None:
        """Origins are compared case-insensitively: they are kept lowercased."""
        config = self.accepted(
            dev(CORS_ALLOWED_ORIGINS="https://App.example.com, http://localhost:5173")
        )
        self.assertEqual(
            config.cors_allowed_origins,
            frozenset({"https://app.example.com", "http://localhost:5173"}),
        )

    def test_cors_origins_refused(self) -> None:
        """A wildcard, a path or a bare host is not an origin."""
        message = (
            "CORS_ALLOWED_ORIGINS must list origins such as https://app.example.com"
            " (scheme, host and optional port; no path, no wildcard)"
        )
        self.refused(dev(CORS_ALLOWED_ORIGINS="https://a.example.com/app"), message)
        self.refused(dev(CORS_ALLOWED_ORIGINS="https://a.example.com/"), message)
        self.refused(
            dev(CORS_ALLOWED_ORIGINS="*"),
            "CORS_ALLOWED_ORIGINS must hold absolute URLs without credentials, query or fragment",
        )


class EveryRefusalTests(ConfigTestMixin, SynchronousTestCase):
    """
    A refused configuration names its first failed rule (what startup
    prints) and lists every failed rule in C{messages} (what check-config
    reports).
    """

    def test_all_failed_rules_listed_in_order(self) -> None:
        """Missing TLS files and HMAC key, a bad boolean and a bad port: four messages."""
        environ = production(
            TLS_CERT_FILE=None,
            TLS_KEY_FILE=None,
            STREAMS_HMAC_KEY=None,
            JTI_FAIL_OPEN="maybe",
            PORT="http",
        )
        error = self.assertRaises(ConfigError, GatewayConfig.from_environ, environ)
        self.assertEqual(
            error.messages,
            (
                "JTI_FAIL_OPEN must be a boolean (true or false)",
                "PORT must be an integer",
                "TLS_CERT_FILE/TLS_KEY_FILE required; set INSECURE_HTTP=true to run plaintext",
                "STREAMS_HMAC_KEY is required when CARACAL_ENV=production",
            ),
        )
        self.assertEqual(str(error), error.messages[0])

    def test_one_failed_rule_is_one_message(self) -> None:
        """A single failure keeps its message as both C{str} and C{messages}."""
        error = self.assertRaises(ConfigError, GatewayConfig.from_environ, production(STS_URL=None))
        self.assertEqual(error.messages, ("STS_URL is required",))

    def test_unknown_environment_judged_as_production(self) -> None:
        """An unknown CARACAL_ENV fails, and the production rules still apply (fail closed)."""
        error = self.assertRaises(
            ConfigError,
            GatewayConfig.from_environ,
            dev(CARACAL_ENV="staging", INSECURE_HTTP="true", TLS_CERT_FILE=None, TLS_KEY_FILE=None),
        )
        self.assertEqual(error.messages[0], "CARACAL_ENV must be production or dev")
        self.assertIn(
            "INSECURE_HTTP and INSECURE_STS are forbidden when CARACAL_ENV=production",
            error.messages,
        )

    def test_missing_services_all_named(self) -> None:
        """STS_URL, DATABASE_URL and REDIS_URL missing together: three messages."""
        error = self.assertRaises(
            ConfigError,
            GatewayConfig.from_environ,
            dev(STS_URL=None, DATABASE_URL=None, REDIS_URL=None),
        )
        self.assertEqual(
            error.messages,
            ("STS_URL is required", "DATABASE_URL is required", "REDIS_URL is required"),
        )


class MetricsAccessTests(ConfigTestMixin, SynchronousTestCase):
    """C{METRICS_BEARER} and C{METRICS_ADDRESS} (SPEC section 12)."""

    def test_defaults(self) -> None:
        """Unset: no bearer, no address; /metrics public in dev, hidden in production."""
        config = self.accepted(production())
        self.assertIsNone(config.metrics_bearer)
        self.assertIsNone(config.metrics_address)
        self.assertIsNone(config.metrics_listen)
        self.assertFalse(config.metrics_public)
        self.assertTrue(self.accepted(dev()).metrics_public)

    def test_bearer_makes_public_metrics_possible_in_production(self) -> None:
        """In production, a bearer puts /metrics back on the public listener."""
        config = self.accepted(production(METRICS_BEARER="m-" + "b" * 30))
        self.assertTrue(config.metrics_public)
        self.assertEqual(config.metrics_bearer, "m-" + "b" * 30)

    def test_address_takes_metrics_off_the_public_listener(self) -> None:
        """With METRICS_ADDRESS, /metrics is never on the public listener."""
        for environ in (
            dev(METRICS_ADDRESS="127.0.0.1:9090"),
            production(METRICS_ADDRESS="127.0.0.1:9090", METRICS_BEARER="x" * 32),
        ):
            config = self.accepted(environ)
            self.assertFalse(config.metrics_public)
            self.assertEqual(config.metrics_listen, ("127.0.0.1", 9090))

    def test_address_forms(self) -> None:
        """IPv4, bracketed IPv6 and host names are accepted with a port."""
        for text, expected in (
            ("127.0.0.1:9090", ("127.0.0.1", 9090)),
            ("[::1]:9090", ("::1", 9090)),
            ("metrics.internal:1", ("metrics.internal", 1)),
            ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ):
            self.assertEqual(self.accepted(dev(METRICS_ADDRESS=text)).metrics_listen, expected)

    def test_malformed_address_refused(self) -> None:
        """A malformed METRICS_ADDRESS is a startup error naming the variable."""
        for text in (
            "9090",
            ":9090",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "::1:9090",
            "[::1]9090",
            "[nothost]:9090",
            "host name:9090",
            "http://127.0.0.1:9090",
            "127.0.0.1:90a",
        ):
            self.refused(
                dev(METRICS_ADDRESS=text), "METRICS_ADDRESS must be host:port, e.g. 127.0.0.1:9090"
            )

    def test_bearer_must_be_a_header_token(self) -> None:
        """A bearer with a blank or a control character cannot be sent: refused."""
        for bearer in ("two words", "tab\there", "caf\u00e9"):
            self.refused(
                dev(METRICS_BEARER=bearer), "METRICS_BEARER must be printable ASCII without spaces"
            )

    def test_bearer_redacted(self) -> None:
        """The startup log shows that a bearer is set, never the bearer."""
        config = self.accepted(dev(METRICS_BEARER="bearer-s3cret-value", METRICS_ADDRESS="[::1]:9"))
        redacted = config.redacted()
        self.assertEqual(redacted["METRICS_BEARER"], "***")
        self.assertEqual(redacted["METRICS_ADDRESS"], "[::1]:9")
        self.assertNotIn("bearer-s3cret-value", json.dumps(redacted))
        self.assertNotIn("bearer-s3cret-value", repr(config))


class EveryRefusalWithFilesTests(ConfigTestMixin, SynchronousTestCase):
    """Secrets from files (SPEC 16) with every failed rule reported (SPEC 12 check-config)."""

    def test_unreadable_file_reported_once(self) -> None:
        """
        An unreadable C{DATABASE_URL_FILE} is one message (naming the file),
        not also "DATABASE_URL is required"; the other failed rules follow.
        """
        missing = self.mktemp()
        error = self.assertRaises(
            ConfigError,
            GatewayConfig.from_environ,
            production(DATABASE_URL=None, DATABASE_URL_FILE=missing, STREAMS_HMAC_KEY=None),
        )
        self.assertEqual(len(error.messages), 2, error.messages)
        self.assertEqual(
            error.messages[0], "STREAMS_HMAC_KEY is required when CARACAL_ENV=production"
        )
        self.assertTrue(error.messages[1].startswith(f"DATABASE_URL_FILE: cannot read {missing}"))

    def test_metrics_bearer_from_file(self) -> None:
        """C{METRICS_BEARER_FILE} gives the bearer, its trailing newline stripped."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("bearer-from-a-file-0123456789\n")
        config = self.accepted(dev(METRICS_BEARER_FILE=path))
        self.assertEqual(config.metrics_bearer, "bearer-from-a-file-0123456789")
        self.assertEqual(config.redacted()["METRICS_BEARER"], "***")


class EveryRefusalWithAgentSettingsTests(ConfigTestMixin, SynchronousTestCase):
    """The SPEC 13 settings join the list of failed rules like the others."""

    def test_missing_sts_url_not_reported_twice(self) -> None:
        """
        Without STS_URL the default authorization server is not judged (the
        missing STS_URL is the one message); a bad PUBLIC_URL is still named.
        """
        error = self.assertRaises(
            ConfigError,
            GatewayConfig.from_environ,
            dev(STS_URL=None, PUBLIC_URL="http://gw.example.com"),
        )
        self.assertEqual(
            error.messages,
            (
                "STS_URL is required",
                "PUBLIC_URL must be an absolute https URL of the gateway's root,"
                " such as https://gateway.example.com",
            ),
        )


class AuditVariableTests(ConfigTestMixin, SynchronousTestCase):
    """C{AUDIT_STREAM_MAXLEN}, C{AUDIT_SPOOL_DIR} and C{AUDIT_SPOOL_MAX_BYTES} (SPEC 12 H9, 14)."""

    def test_defaults(self) -> None:
        """Unset, they take the SPEC's defaults."""
        config = self.accepted(production())
        self.assertEqual(config.audit_stream_maxlen, 1_000_000)
        self.assertEqual(config.audit_spool_dir, "/var/lib/caracal-gateway/audit-spool")
        self.assertEqual(config.audit_spool_max_bytes, 1024**3)
        self.assertEqual(config.redacted()["AUDIT_SPOOL_MAX_BYTES"], 1024**3)

    def test_values_read(self) -> None:
        """Set, they are read; sizes accept binary and decimal units."""
        config = self.accepted(
            dev(
                AUDIT_STREAM_MAXLEN="5000", AUDIT_SPOOL_DIR="/tmp/s", AUDIT_SPOOL_MAX_BYTES="512MiB"
            )
        )
        self.assertEqual(config.audit_stream_maxlen, 5000)
        self.assertEqual(config.audit_spool_dir, "/tmp/s")
        self.assertEqual(config.audit_spool_max_bytes, 512 * 1024**2)
        for text, size in (("1000", 1000), ("1GiB", 1024**3), ("10KiB", 10240), ("2MB", 2 * 10**6)):
            self.assertEqual(parse_size(text), size, text)

    def test_malformed_refused(self) -> None:
        """A malformed size or length is a startup error naming the variable."""
        self.refused(
            dev(AUDIT_SPOOL_MAX_BYTES="lots"),
            "AUDIT_SPOOL_MAX_BYTES must be a size in bytes such as 1000, 512MiB or 1GiB",
        )
        self.refused(dev(AUDIT_SPOOL_MAX_BYTES="-1"), self.size_message)
        self.refused(
            dev(AUDIT_STREAM_MAXLEN="0"),
            "AUDIT_STREAM_MAXLEN must be between 1 and 4611686018427387904",
        )

    size_message = "AUDIT_SPOOL_MAX_BYTES must be a size in bytes such as 1000, 512MiB or 1GiB"
