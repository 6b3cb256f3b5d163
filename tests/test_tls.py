# -*- test-case-name: tests.test_tls -*-
"""
Unit tests for L{caracal.gateway.tls}: every startup refusal names the file
and the reason, the server context's protocol floor, reload and file watching
on a L{task.Clock}, the SIGHUP hook and the outbound policy's bundle checks.
Handshakes here run between two in-memory OpenSSL connections (no sockets).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from types import SimpleNamespace

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import task
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface.verify import verifyObject

from caracal.gateway import tls
from caracal.gateway.config import ConfigError
from caracal.gateway.tls import (
    ServerTLS,
    client_tls_policy,
    install_sighup_reload,
    load_server_certificate,
)
from tests.support.certs import client_context, make_authority, make_chain, make_leaf

UTC = datetime.timezone.utc


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _handshake(server_context: SSL.Context, client_context: SSL.Context):
    """
    Run a TLS handshake between two memory-BIO connections.

    @return: (server connection, client connection) after success.
    @raise SSL.Error: either side refused.
    """
    client = SSL.Connection(client_context, None)
    client.set_tlsext_host_name(b"localhost")
    return _connect(SSL.Connection(server_context, None), client)


def _connect(server: SSL.Connection, client: SSL.Connection):
    """Drive a handshake between two memory-BIO connections."""
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(20):
        done = 0
        for here, there in ((client, server), (server, client)):
            try:
                here.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
            try:
                data = here.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                there.bio_write(data)
        if done == 2:
            return server, client
    raise AssertionError("handshake did not finish")


class LoadServerCertificateTests(SynchronousTestCase):
    """
    L{load_server_certificate} accepts a good chain and refuses each bad file
    with one line naming the variable, the path and the reason.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.root, self.leaf = make_chain(self.directory)
        self.cert_file = os.path.join(self.directory, "server.crt")
        self.key_file = os.path.join(self.directory, "server.key")

    def assertRefused(self, message, cert_file=None, key_file=None, now=None):
        error = self.assertRaises(
            ConfigError,
            load_server_certificate,
            cert_file or self.cert_file,
            key_file or self.key_file,
            now=now,
        )
        self.assertEqual(str(error), message)
        self.assertNotIn("\n", str(error))
        return error

    def test_good_chain(self):
        """The leaf comes first, the intermediate after it; the key matches."""
        credentials = load_server_certificate(self.cert_file, self.key_file)
        self.assertEqual(credentials.leaf, self.leaf.cert)
        self.assertEqual(list(credentials.intermediates), list(self.leaf.intermediates))
        self.assertEqual(len(credentials.chain), 2)
        self.assertEqual(credentials.not_after, self.leaf.cert.not_valid_after_utc)
        self.assertEqual(credentials.not_after.tzinfo, UTC)
        self.assertEqual(credentials.subject, "CN=localhost")
        self.assertEqual(len(credentials.fingerprint), 64)

    def test_repr_hides_key(self):
        """The private key never shows up in the credentials' repr."""
        credentials = load_server_certificate(self.cert_file, self.key_file)
        text = repr(credentials)
        self.assertNotIn("key=", text)
        self.assertNotIn("PRIVATE", text)

    def test_missing_cert_file(self):
        """A missing certificate file is refused, naming the variable, path and reason."""
        missing = os.path.join(self.directory, "absent.crt")
        self.assertRefused(
            f"TLS_CERT_FILE {missing}: cannot read: No such file or directory",
            cert_file=missing,
        )

    def test_missing_key_file(self):
        """A missing key file is refused, naming the variable, path and reason."""
        missing = os.path.join(self.directory, "absent.key")
        self.assertRefused(
            f"TLS_KEY_FILE {missing}: cannot read: No such file or directory",
            key_file=missing,
        )

    def test_cert_file_is_a_directory(self):
        """A directory given as certificate file is refused."""
        self.assertRefused(
            f"TLS_CERT_FILE {self.directory}: cannot read: Is a directory",
            cert_file=self.directory,
        )

    def test_cert_garbage(self):
        """A certificate file without PEM is refused."""
        garbage = _write(os.path.join(self.directory, "garbage.crt"), b"not a certificate\n")
        self.assertRefused(f"TLS_CERT_FILE {garbage}: no PEM certificate found", cert_file=garbage)

    def test_cert_reported_before_key(self):
        """With both files bad, the certificate is named first."""
        garbage = _write(os.path.join(self.directory, "garbage.crt"), b"nope")
        self.assertRefused(
            f"TLS_CERT_FILE {garbage}: no PEM certificate found",
            cert_file=garbage,
            key_file=os.path.join(self.directory, "absent.key"),
        )

    def test_naive_now_is_utc(self):
        """A naive C{now} is taken as UTC when judging expiry."""
        not_after = self.leaf.cert.not_valid_after_utc
        self.assertRaises(
            ConfigError,
            load_server_certificate,
            self.cert_file,
            self.key_file,
            now=not_after.replace(tzinfo=None),
        )

    def test_cert_empty(self):
        """An empty certificate file is refused."""
        empty = _write(os.path.join(self.directory, "empty.crt"), b"")
        self.assertRefused(f"TLS_CERT_FILE {empty}: no PEM certificate found", cert_file=empty)

    def test_cert_malformed_pem(self):
        """A PEM block that is not a certificate is refused as malformed."""
        broken = _write(
            os.path.join(self.directory, "broken.crt"),
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        )
        self.assertRefused(f"TLS_CERT_FILE {broken}: malformed PEM certificate", cert_file=broken)

    def test_key_garbage(self):
        """A key file without a PEM key is refused."""
        garbage = _write(os.path.join(self.directory, "garbage.key"), b"hunter2\n")
        self.assertRefused(f"TLS_KEY_FILE {garbage}: not a PEM private key", key_file=garbage)

    def test_key_malformed_pem(self):
        """A broken key block is refused without echoing any of its bytes."""
        body = b"c2VjcmV0LWtleS1tYXRlcmlhbA=="
        broken = _write(
            os.path.join(self.directory, "broken.key"),
            b"-----BEGIN PRIVATE KEY-----\n" + body + b"\n-----END PRIVATE KEY-----\n",
        )
        error = self.assertRefused(f"TLS_KEY_FILE {broken}: not a PEM private key", key_file=broken)
        self.assertNotIn(body.decode(), str(error))

    def test_certificate_given_as_key(self):
        """TLS_KEY_FILE pointing at the certificate is named as such."""
        self.assertRefused(
            f"TLS_KEY_FILE {self.cert_file}: not a PEM private key (it holds a certificate)",
            key_file=self.cert_file,
        )

    def test_key_given_as_certificate(self):
        """The key file given as certificate is refused: it holds no certificate."""
        self.assertRefused(
            f"TLS_CERT_FILE {self.key_file}: no PEM certificate found", cert_file=self.key_file
        )

    def test_encrypted_key(self):
        """An encrypted private key is refused: the gateway has no passphrase."""
        encrypted = _write(
            os.path.join(self.directory, "encrypted.key"),
            self.leaf.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            ),
        )
        self.assertRefused(
            f"TLS_KEY_FILE {encrypted}: encrypted private keys are not supported",
            key_file=encrypted,
        )

    def test_key_does_not_match(self):
        """A key that does not match the certificate is refused, naming both variables."""
        other = make_leaf(make_authority())
        other_key = _write(os.path.join(self.directory, "other.key"), other.key_pem)
        error = self.assertRefused(
            f"TLS_KEY_FILE {other_key}: does not match the certificate in TLS_CERT_FILE",
            key_file=other_key,
        )
        self.assertNotIn("PRIVATE", str(error))

    def test_chain_out_of_order(self):
        """An intermediate before the leaf is refused with the expected order."""
        reordered = _write(
            os.path.join(self.directory, "reordered.crt"),
            self.leaf.intermediates[0].public_bytes(serialization.Encoding.PEM)
            + self.leaf.cert.public_bytes(serialization.Encoding.PEM),
        )
        self.assertRefused(
            f"TLS_CERT_FILE {reordered}: the certificate for TLS_KEY_FILE is not first"
            " (leaf first, then intermediates)",
            cert_file=reordered,
        )

    def assertRefusedExpired(self, not_after, shown: str, now=None):
        """A certificate that ended at C{not_after} is refused, its end C{shown}."""
        leaf = make_leaf(make_authority(), not_after=not_after)
        cert_file, key_file = leaf.write(self.directory, "expired")
        self.assertRefused(
            f"TLS_CERT_FILE {cert_file}: certificate expired on {shown}",
            cert_file=cert_file,
            key_file=key_file,
            now=now,
        )

    def test_expired(self):
        """An expired certificate is refused with its expiry date."""
        self.assertRefusedExpired(
            datetime.datetime(2026, 1, 1, tzinfo=UTC),
            "2026-01-01T00:00:00Z",
            now=datetime.datetime(2026, 3, 1, tzinfo=UTC),
        )

    def test_expired_by_wall_clock(self):
        """Without C{now}, the wall clock decides."""
        self.assertRefusedExpired(datetime.datetime(2020, 1, 1, tzinfo=UTC), "2020-01-01T00:00:00Z")

    def test_not_yet_valid(self):
        """A certificate not yet valid is refused with its start date."""
        not_before = self.leaf.cert.not_valid_before_utc
        self.assertRefused(
            f"TLS_CERT_FILE {self.cert_file}: certificate not valid before"
            f" {not_before.strftime('%Y-%m-%dT%H:%M:%SZ')}",
            now=not_before - datetime.timedelta(hours=1),
        )

    def test_valid_at_the_edges(self):
        """Valid from not_before up to (not including) not_after."""
        load_server_certificate(
            self.cert_file, self.key_file, now=self.leaf.cert.not_valid_before_utc
        )
        self.assertRaises(
            ConfigError,
            load_server_certificate,
            self.cert_file,
            self.key_file,
            now=self.leaf.cert.not_valid_after_utc,
        )


class ServerContextTests(SynchronousTestCase):
    """
    The server context: TLS 1.2 floor, TLS 1.3 offered, whole chain sent.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.root, self.leaf = make_chain(self.directory)
        self.server_tls = ServerTLS(
            os.path.join(self.directory, "server.crt"),
            os.path.join(self.directory, "server.key"),
            clock=task.Clock(),
        )

    def test_creator_interface(self):
        """The server connection creator provides its interface and makes SSL connections."""
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, self.server_tls.creator))
        connection = self.server_tls.creator.serverConnectionForTLS(None)
        self.assertIsInstance(connection, SSL.Connection)

    def test_tls13_offered(self):
        """A modern client gets TLS 1.3."""
        _, client = _handshake(self.server_tls._context, client_context())
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.3")

    def test_tls12_accepted(self):
        """A TLS 1.2 client is accepted."""
        _, client = _handshake(self.server_tls._context, client_context(SSL.TLS1_2_VERSION))
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.2")

    def test_chain_presented(self):
        """The whole chain (leaf and intermediates) is presented."""
        _, client = _handshake(self.server_tls._context, client_context())
        chain = [c.to_cryptography() for c in client.get_peer_cert_chain()]
        self.assertEqual(chain, [self.leaf.cert, *self.leaf.intermediates])

    def _alpn_handshake(self, offered: list[bytes]):
        context = client_context()
        context.set_alpn_protos(offered)
        return _handshake(self.server_tls._context, context)

    def test_alpn_http11_selected(self):
        """A client offering h2 and http/1.1 over ALPN gets http/1.1 (SPEC 13)."""
        server, client = self._alpn_handshake([b"h2", b"http/1.1"])
        self.assertEqual(client.get_alpn_proto_negotiated(), b"http/1.1")
        self.assertEqual(server.get_alpn_proto_negotiated(), b"http/1.1")

    def test_alpn_h2_only_gets_no_protocol(self):
        """
        A client offering only h2 completes the handshake with no protocol
        selected: the gateway never claims to speak h2.
        """
        _, client = self._alpn_handshake([b"h2"])
        self.assertEqual(client.get_alpn_proto_negotiated(), b"")

    def test_alpn_not_offered(self):
        """A client without ALPN still connects, with no protocol negotiated."""
        _, client = _handshake(self.server_tls._context, client_context())
        self.assertEqual(client.get_alpn_proto_negotiated(), b"")

    def test_reloaded_context_offers_alpn(self):
        """A context rebuilt by a certificate reload keeps offering http/1.1."""
        self.server_tls._context = tls.server_context(self.server_tls.credentials)
        _, client = self._alpn_handshake([b"http/1.1"])
        self.assertEqual(client.get_alpn_proto_negotiated(), b"http/1.1")

    def test_old_protocols_refused_by_the_floor(self):
        """
        TLS 1.0/1.1 are refused because of the configured minimum, not only
        because of OpenSSL's security level: with the level lowered on our
        context they are still refused, while a context without the floor
        accepts them from the same client.
        """
        context = self.server_tls._context
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        control = SSL.Context(SSL.TLS_METHOD)
        control.set_min_proto_version(SSL.TLS1_VERSION)
        control.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        credentials = self.server_tls.credentials
        control.use_certificate(crypto.X509.from_cryptography(credentials.leaf))
        control.use_privatekey(crypto.PKey.from_cryptography_key(credentials.key))
        for version, name in ((SSL.TLS1_VERSION, "TLSv1"), (SSL.TLS1_1_VERSION, "TLSv1.1")):
            _, client = _handshake(control, client_context(version, seclevel0=True))
            self.assertEqual(client.get_protocol_version_name(), name)
            self.assertRaises(
                SSL.Error, _handshake, context, client_context(version, seclevel0=True)
            )

    def test_compression_off(self):
        """TLS compression is off and the server's cipher preference applies."""
        options = self.server_tls._context.set_options(0)
        self.assertTrue(options & SSL.OP_NO_COMPRESSION)
        self.assertTrue(options & SSL.OP_CIPHER_SERVER_PREFERENCE)


class ReloadTests(SynchronousTestCase):
    """
    L{ServerTLS.reload} swaps the certificate for new connections only, and
    keeps the old one when the new files are bad.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.root, self.leaf = make_chain(self.directory)
        self.cert_file = os.path.join(self.directory, "server.crt")
        self.key_file = os.path.join(self.directory, "server.key")
        self.clock = task.Clock()
        self.server_tls = ServerTLS(self.cert_file, self.key_file, clock=self.clock)
        self.events = []
        self.patch(tls, "log", Logger(namespace="test", observer=self.events.append))

    def served(self):
        """The leaf a new connection would present."""
        connection = self.server_tls.creator.serverConnectionForTLS(None)
        return connection.get_certificate().to_cryptography()

    def renew(self, **options):
        """Write a fresh leaf from a new chain over the served files."""
        staging = self.mktemp()
        os.makedirs(staging)
        _, leaf = make_chain(staging, **options)
        # Replace by rename, as certbot-style renewals do: a new inode.
        os.replace(os.path.join(staging, "server.crt"), self.cert_file)
        os.replace(os.path.join(staging, "server.key"), self.key_file)
        return leaf

    def messages(self):
        return [formatEvent(event) for event in self.events]

    def test_reload_serves_new_certificate(self):
        """A reload makes new connections get the renewed certificate."""
        before = self.server_tls.creator.serverConnectionForTLS(None)
        renewed = self.renew()
        self.assertTrue(self.server_tls.reload())
        self.assertEqual(self.served(), renewed.cert)
        self.assertEqual(self.server_tls.not_after, renewed.cert.not_valid_after_utc)
        # A connection made before keeps the context it was made with.
        self.assertEqual(before.get_certificate().to_cryptography(), self.leaf.cert)
        self.assertEqual(len(self.messages()), 1)
        self.assertIn("reloaded", self.messages()[0])

    def test_reload_keeps_old_on_garbage(self):
        """A reload finding garbage keeps the old certificate and logs why."""
        _write(self.cert_file, b"garbage")
        self.assertFalse(self.server_tls.reload())
        self.assertEqual(self.served(), self.leaf.cert)
        self.assertEqual(self.server_tls.not_after, self.leaf.cert.not_valid_after_utc)
        [message] = self.messages()
        self.assertIn(f"TLS_CERT_FILE {self.cert_file}: no PEM certificate found", message)
        self.assertEqual(self.events[0]["log_level"].name, "error")

    def test_reload_keeps_old_on_missing_key(self):
        """A reload without a key file keeps the old certificate and logs why."""
        os.remove(self.key_file)
        self.assertFalse(self.server_tls.reload())
        self.assertEqual(self.served(), self.leaf.cert)
        [message] = self.messages()
        self.assertIn("cannot read: No such file or directory", message)

    def test_reload_keeps_old_on_mismatch(self):
        """Only the certificate renewed (the key not yet): refused, old kept."""
        other = make_leaf(make_authority())
        _write(self.cert_file, other.chain_pem)
        self.assertFalse(self.server_tls.reload())
        self.assertEqual(self.served(), self.leaf.cert)
        [message] = self.messages()
        self.assertIn("does not match", message)
        self.assertNotIn("PRIVATE", message)

    def test_reload_keeps_old_on_expired(self):
        """A reload finding an expired certificate keeps the old one."""
        self.renew(not_after=datetime.datetime(2020, 1, 1, tzinfo=UTC))
        self.assertFalse(self.server_tls.reload())
        self.assertEqual(self.served(), self.leaf.cert)
        self.assertIn("expired on 2020-01-01T00:00:00Z", self.messages()[0])

    def test_construction_refuses_bad_files(self):
        """Bad files at construction are a ConfigError, not a kept certificate."""
        _write(self.key_file, b"")
        error = self.assertRaises(ConfigError, ServerTLS, self.cert_file, self.key_file)
        self.assertEqual(str(error), f"TLS_KEY_FILE {self.key_file}: not a PEM private key")

    def test_repr(self):
        """The repr names the certificate file and never shows the key."""
        text = repr(self.server_tls)
        self.assertIn(self.cert_file, text)
        self.assertNotIn("PRIVATE", text)


class WatchTests(ReloadTests):
    """
    L{ServerTLS.watch} polls the files on the clock and reloads on change.
    """

    def setUp(self):
        super().setUp()
        self.reloads = []
        original = self.server_tls.reload

        def counting_reload():
            result = original()
            self.reloads.append(result)
            return result

        self.server_tls.reload = counting_reload
        self.loop = self.server_tls.watch(interval=5.0)
        self.addCleanup(lambda: self.loop.running and self.loop.stop())

    def test_no_change_no_reload(self):
        """Unchanged files are not reloaded."""
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.reloads, [])

    def test_renamed_files_reloaded(self):
        """Files replaced by a rename are reloaded at the next poll."""
        renewed = self.renew()
        self.clock.advance(4.9)
        self.assertEqual(self.reloads, [])
        self.clock.advance(0.1)
        self.assertEqual(self.reloads, [True])
        self.assertEqual(self.served(), renewed.cert)
        self.clock.advance(5)
        self.assertEqual(self.reloads, [True])

    def test_rewritten_in_place_reloaded(self):
        """Same inode, possibly same size: the modification time tells."""
        other = make_leaf(make_authority())
        _write(self.cert_file, other.chain_pem)
        _write(self.key_file, other.key_pem)
        stat = os.stat(self.cert_file)
        os.utime(self.cert_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        self.clock.advance(5)
        self.assertEqual(self.reloads, [True])
        self.assertEqual(self.served(), other.cert)

    def test_half_renewed_then_completed(self):
        """
        A renewal caught between the two writes fails once, keeps the old
        certificate, and succeeds on the poll after the key lands.
        """
        other = make_leaf(make_authority())
        _write(self.cert_file, other.chain_pem)
        self.clock.advance(5)
        self.assertEqual(self.reloads, [False])
        self.assertEqual(self.served(), self.leaf.cert)
        self.clock.advance(5)
        self.assertEqual(self.reloads, [False])
        _write(self.key_file, other.key_pem)
        self.clock.advance(5)
        self.assertEqual(self.reloads, [False, True])
        self.assertEqual(self.served(), other.cert)

    def test_stop(self):
        """A stopped watch reloads nothing."""
        self.loop.stop()
        self.renew()
        self.clock.advance(10)
        self.assertEqual(self.reloads, [])
        self.assertEqual(self.served(), self.leaf.cert)

    def test_sighup_reload_then_no_double_reload(self):
        """A reload done otherwise (SIGHUP) is not repeated by the watch."""
        renewed = self.renew()
        self.server_tls.reload()
        self.clock.advance(5)
        self.assertEqual(self.reloads, [True])
        self.assertEqual(self.served(), renewed.cert)


class _RecordingReactor:
    def __init__(self):
        self.calls = []

    def callFromThread(self, f, *args, **kwargs):
        self.calls.append((f, args, kwargs))


class SighupTests(SynchronousTestCase):
    """
    L{install_sighup_reload} makes SIGHUP schedule a reload on the reactor.
    """

    def test_sighup_schedules_reload(self):
        """SIGHUP schedules a reload in the reactor rather than running it in the handler."""
        directory = self.mktemp()
        os.makedirs(directory)
        make_chain(directory)
        server_tls = ServerTLS(
            os.path.join(directory, "server.crt"),
            os.path.join(directory, "server.key"),
            clock=task.Clock(),
        )
        reactor = _RecordingReactor()
        marker = signal.getsignal(signal.SIGHUP)
        previous = install_sighup_reload(server_tls, reactor)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        self.assertIs(previous, marker)
        os.kill(os.getpid(), signal.SIGHUP)
        # Python runs the handler at the next bytecode boundary in this thread.
        for _ in range(1000):
            if reactor.calls:
                break
        self.assertEqual(reactor.calls, [(server_tls.reload, (), {})])


class ClientPolicyTests(SynchronousTestCase):
    """
    L{client_tls_policy} checks the extra bundle at startup and hands out
    hostname-verifying creators.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.root, self.leaf = make_chain(self.directory)
        self.ca_file = os.path.join(self.directory, "server-ca.pem")

    def test_policy_interface(self):
        """The client policy provides IPolicyForHTTPS and caches a creator per host."""
        policy = client_tls_policy(self.ca_file, variable="STS_CA_FILE")
        self.assertTrue(verifyObject(IPolicyForHTTPS, policy))
        creator = policy.creatorForNetloc(b"localhost", 443)
        self.assertTrue(verifyObject(IOpenSSLClientConnectionCreator, creator))
        self.assertIs(policy.creatorForNetloc(b"localhost", 443), creator)
        self.assertIsNot(policy.creatorForNetloc(b"sts.example", 443), creator)

    def test_no_bundle(self):
        """Without a CA bundle the policy still provides IPolicyForHTTPS."""
        policy = client_tls_policy(None)
        self.assertTrue(verifyObject(IPolicyForHTTPS, policy))

    def test_missing_bundle(self):
        """A missing CA bundle is refused, naming the variable."""
        missing = os.path.join(self.directory, "absent.pem")
        error = self.assertRaises(ConfigError, client_tls_policy, missing, variable="STS_CA_FILE")
        self.assertEqual(
            str(error), f"STS_CA_FILE {missing}: cannot read: No such file or directory"
        )

    def test_garbage_bundle_default_variable(self):
        """A bundle without PEM is refused, under UPSTREAM_CA_FILE by default."""
        garbage = _write(os.path.join(self.directory, "garbage.pem"), b"nope")
        error = self.assertRaises(ConfigError, client_tls_policy, garbage)
        self.assertEqual(str(error), f"UPSTREAM_CA_FILE {garbage}: no PEM certificate found")

    def test_malformed_bundle(self):
        """A malformed PEM certificate in a bundle is refused."""
        broken = _write(
            os.path.join(self.directory, "broken.pem"),
            b"-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n",
        )
        error = self.assertRaises(ConfigError, client_tls_policy, broken, variable="STS_CA_FILE")
        self.assertEqual(str(error), f"STS_CA_FILE {broken}: malformed PEM certificate")

    def test_trust_root_adds_bundle(self):
        """
        The bundle's root joins the platform roots: a chain under it verifies
        against the store the policy builds, and not without the bundle.
        """

        def verify(policy):
            context = SSL.Context(SSL.TLS_METHOD)
            policy._trust_root._addCACertsToContext(context)
            crypto.X509StoreContext(
                context.get_cert_store(),
                crypto.X509.from_cryptography(self.leaf.cert),
                chain=[crypto.X509.from_cryptography(c) for c in self.leaf.intermediates],
            ).verify_certificate()

        verify(client_tls_policy(self.ca_file))
        self.assertRaises(crypto.X509StoreContextError, verify, client_tls_policy(None))

    def test_outbound_floor(self):
        """
        Outbound connections exclude TLS 1.0 and 1.1 by configuration (the
        protocol-exclusion options Twisted applies for C{raiseMinimumTo}),
        not only through OpenSSL's security level.
        """
        creator = client_tls_policy(self.ca_file).creatorForNetloc(b"localhost", 443)
        # Twisted only reads the wrapped factory (for ALPN) from the protocol.
        protocol = SimpleNamespace(factory=SimpleNamespace(wrappedFactory=object()))
        connection = creator.clientConnectionForTLS(protocol)
        options = connection.set_options(0)
        excluded = SSL.OP_NO_SSLv3 | SSL.OP_NO_TLSv1 | SSL.OP_NO_TLSv1_1
        self.assertEqual(options & excluded, excluded)
        self.assertFalse(options & SSL.OP_NO_TLSv1_2)
        self.assertFalse(options & SSL.OP_NO_TLSv1_3)


def _flow(source: SSL.Connection, sink: SSL.Connection) -> None:
    """Move whatever C{source} has written to its memory BIO into C{sink}'s."""
    try:
        data = source.bio_read(65536)
    except SSL.WantReadError:
        return
    sink.bio_write(data)


def _read_all(connection: SSL.Connection) -> bytes:
    """The application bytes C{connection} can decrypt now."""
    received = b""
    while True:
        try:
            received += connection.recv(65536)
        except SSL.WantReadError:
            return received


class ReleaseBIOBuffersTests(SynchronousTestCase):
    """
    L{tls.release_bio_buffers}: a connection's memory BIOs are replaced by
    empty ones only when nothing waits in them, and the connection goes on.
    """

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        make_chain(directory)
        self.server_tls = ServerTLS(
            os.path.join(directory, "server.crt"),
            os.path.join(directory, "server.key"),
            clock=task.Clock(),
        )
        self.server, self.client = _handshake(self.server_tls._context, client_context())

    def exchange(self, server: SSL.Connection, client: SSL.Connection, size: int) -> None:
        """C{size} bytes each way, through the memory BIOs."""
        client.sendall(b"q" * size)
        _flow(client, server)
        self.assertEqual(_read_all(server), b"q" * size)
        server.sendall(b"a" * size)
        _flow(server, client)
        self.assertEqual(_read_all(client), b"a" * size)

    def test_replaced_and_connection_goes_on(self):
        """
        With both BIOs empty they are replaced (the ones pyOpenSSL reads and
        writes through with them), and data still flows both ways, for TLS
        1.3 and TLS 1.2 alike.
        """
        for version in (None, SSL.TLS1_2_VERSION):
            server, client = _handshake(self.server_tls._context, client_context(version))
            _flow(server, client)  # the TLS 1.3 tickets, if any
            _read_all(client)
            self.exchange(server, client, 3000)
            into, out = server._into_ssl, server._from_ssl
            self.assertTrue(tls.release_bio_buffers(server))
            self.assertNotEqual(server._into_ssl, into)
            self.assertNotEqual(server._from_ssl, out)
            self.exchange(server, client, 3000)
            self.exchange(server, client, 20)

    def test_not_while_bytes_wait(self):
        """
        Bytes waiting in either BIO (received and not read yet, or written
        and not sent yet) keep both BIOs in place and the bytes intact.
        """
        server, client = self.server, self.client
        _flow(server, client)
        _read_all(client)
        client.sendall(b"unread")
        _flow(client, server)
        into, out = server._into_ssl, server._from_ssl
        self.assertFalse(tls.release_bio_buffers(server))
        self.assertEqual((server._into_ssl, server._from_ssl), (into, out))
        self.assertEqual(_read_all(server), b"unread")

        server.sendall(b"unsent")
        self.assertFalse(tls.release_bio_buffers(server))
        self.assertEqual((server._into_ssl, server._from_ssl), (into, out))
        _flow(server, client)
        self.assertEqual(_read_all(client), b"unsent")
        self.assertTrue(tls.release_bio_buffers(server))


def _listener(testcase, protocol, clock):
    """The listener's TLS factory for C{protocol} on C{clock}, with a fresh test chain."""
    directory = testcase.mktemp()
    os.makedirs(directory)
    make_chain(directory)
    server_tls = ServerTLS(
        os.path.join(directory, "server.crt"), os.path.join(directory, "server.key"), clock=clock
    )
    return server_tls.factory(Factory.forProtocol(protocol), clock)


class _Echo(Protocol):
    """Writes back what it receives."""

    def dataReceived(self, data):
        self.transport.write(data)


class ServerTLSProtocolTests(SynchronousTestCase):
    """
    The listener's TLS transport (L{ServerTLS.factory}) releases its memory
    BIOs after the handshake flight and after a large exchange, not after a
    small one, and serves the same bytes either way.
    """

    def setUp(self):
        self.clock = task.Clock()
        factory = _listener(self, _Echo, self.clock)
        self.assertIsInstance(factory, TLSMemoryBIOFactory)
        self.protocol = factory.buildProtocol(None)
        self.assertIsInstance(self.protocol, tls.ServerTLSProtocol)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.client = SSL.Connection(client_context(), None)
        self.client.set_connect_state()
        self.released = []
        release = tls.release_bio_buffers

        def recording(connection):
            done = release(connection)
            self.released.append(done)
            return done

        self.patch(tls, "release_bio_buffers", recording)

    def pump(self) -> None:
        """Run the client and the server until neither has bytes for the other."""
        for _ in range(20):
            with contextlib.suppress(SSL.WantReadError):
                self.client.do_handshake()
            try:
                data = self.client.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                self.protocol.dataReceived(data)
            self.clock.advance(0)  # Twisted's buffered writes
            sent = self.transport.value()
            self.transport.clear()
            if sent:
                self.client.bio_write(sent)
            if not data and not sent:
                return
        raise AssertionError("client and server kept talking")

    def echo(self, size: int) -> None:
        self.client.sendall(b"x" * size)
        self.pump()
        self.assertEqual(_read_all(self.client), b"x" * size)

    def test_released_after_handshake(self):
        """The BIOs that carried the handshake flight are replaced once it is done."""
        self.pump()
        self.assertTrue(self.protocol._handshakeDone)
        self.assertEqual(self.released, [True])
        self.echo(100)

    def test_small_exchange_keeps_them(self):
        """A few hundred bytes each way leave the BIOs (and the CPU) alone."""
        self.pump()
        del self.released[:]
        self.echo(tls.BIO_RELEASE_BYTES // 2)
        self.echo(tls.BIO_RELEASE_BYTES // 2)
        self.assertEqual(self.released, [])

    def test_large_exchange_releases_them(self):
        """
        A large echo (several records) ends with fresh BIOs, replaced once
        both were empty; the exchanges after it are served the same.
        """
        self.pump()
        del self.released[:]
        self.echo(40_000)
        self.assertIn(True, self.released)
        self.assertIs(self.released[-1], True)
        del self.released[:]
        self.echo(10)
        self.assertEqual(self.released, [])
        self.echo(5000)
        self.assertIs(self.released[-1], True)


class _Pieces(Protocol):
    """Answers each chunk received with three writes: C{<}, the chunk, C{>}."""

    def dataReceived(self, data):
        self.transport.write(b"<")
        self.transport.writeSequence([data])
        self.transport.write(b">")


def _records(data: bytes) -> list[int]:
    """The content types of the TLS records in C{data}, in order."""
    types = []
    while data:
        types.append(data[0])
        data = data[5 + int.from_bytes(data[3:5], "big") :]
    return types


class GatheredWritesTests(SynchronousTestCase):
    """
    L{tls.ServerTLSProtocol} gathers a connection's small writes until the
    end of the reactor turn, as Twisted's buffering transport does, holding
    nothing while idle and flushing all connections with one timer.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.factory = _listener(self, _Pieces, self.clock)

    def connect(self):
        """A handshaken (server protocol, its transport, client connection)."""
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        client = SSL.Connection(client_context(), None)
        client.set_connect_state()
        for _ in range(20):
            with contextlib.suppress(SSL.WantReadError):
                client.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                protocol.dataReceived(client.bio_read(65536))
            self.clock.advance(0)
            if transport.value():
                client.bio_write(transport.value())
                transport.clear()
            elif protocol._handshakeDone:
                break
        _read_all(client)  # the session tickets
        return protocol, transport, client

    def send(self, protocol, client, data: bytes) -> None:
        client.sendall(data)
        protocol.dataReceived(client.bio_read(65536))

    def test_one_record_per_turn(self):
        """Three writes of one turn leave at its end, together, in one TLS record."""
        protocol, transport, client = self.connect()
        self.send(protocol, client, b"hello")
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0)
        self.assertEqual(_records(transport.value()), [23])
        client.bio_write(transport.value())
        self.assertEqual(_read_all(client), b"<hello>")

    def test_one_timer_for_all_connections(self):
        """Connections writing in the same turn share one reactor timer."""
        connections = [self.connect() for _ in range(3)]
        for protocol, _transport, client in connections:
            self.send(protocol, client, b"x")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        for _protocol, transport, client in connections:
            client.bio_write(transport.value())
            self.assertEqual(_read_all(client), b"<x>")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_connection_holds_no_buffer(self):
        """Once flushed, a connection keeps no buffer, aggregator or bound write of its own."""
        protocol, _transport, client = self.connect()
        self.send(protocol, client, b"x")
        self.clock.advance(0)
        self.assertIsNone(protocol._gathered)
        self.assertNotIn("_aggregator", vars(protocol))
        self.assertNotIn("write", vars(protocol))

    def test_large_writes_go_at_once(self):
        """Past GATHER_BYTES, what was gathered is sent without waiting for the turn's end."""
        protocol, transport, client = self.connect()
        protocol.write(b"a" * 100)
        self.assertEqual(transport.value(), b"")
        protocol.write(b"b" * tls.GATHER_BYTES)
        self.assertNotEqual(transport.value(), b"")
        client.bio_write(transport.value())
        self.assertEqual(_read_all(client), b"a" * 100 + b"b" * tls.GATHER_BYTES)
        self.clock.advance(0)  # the turn's flush finds nothing left

    def test_lose_connection_sends_gathered_first(self):
        """Bytes written before loseConnection reach the client before the close alert."""
        protocol, transport, client = self.connect()
        protocol.write(b"last words")
        protocol.loseConnection()
        self.assertEqual(_records(transport.value()), [23, 23])  # data, then the alert
        client.bio_write(transport.value())
        self.assertEqual(client.recv(65536), b"last words")
        self.assertRaises(SSL.ZeroReturnError, client.recv, 65536)
        self.clock.advance(0)

    def test_writes_after_connection_lost_dropped(self):
        """A write after the connection is lost is dropped without an error."""
        protocol, transport, _client = self.connect()
        protocol.connectionLost(None)
        transport.clear()
        protocol.write(b"too late")
        self.clock.advance(0)
        self.assertEqual(transport.value(), b"")

    def test_not_bytes_refused(self):
        """Writing what is not bytes raises at once, as with Twisted's transport."""
        protocol, _transport, _client = self.connect()
        with self.assertRaises(TypeError):
            protocol.write("text")
        self.clock.advance(0)
