# -*- test-case-name: tests.test_demo_certificates -*-
"""
Tests for L{caracal.demo.certificates}: the demo's CA and server
certificate, made once, reused while good, renewed before they end.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from caracal.demo.certificates import RENEW_BEFORE, ensure_certificates

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone.utc)


def load(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


class EnsureCertificatesTests(SynchronousTestCase):
    """L{ensure_certificates} in a directory of the test's own."""

    def setUp(self):
        self.directory = self.mktemp()

    def test_made_in_an_empty_directory(self):
        """A CA that may issue no intermediate, and a server certificate it issued for loopback."""
        made = ensure_certificates(self.directory, now=NOW)
        self.assertTrue(made.created)
        ca, leaf = load(made.ca_file), load(made.cert_file)
        leaf.verify_directly_issued_by(ca)
        self.assertEqual(
            ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length, 0
        )
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            names.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        organization = leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
        self.assertEqual(organization, "Caracal demo")
        self.assertEqual(made.not_after, leaf.not_valid_after_utc)
        self.assertEqual(stat.S_IMODE(os.stat(made.key_file).st_mode), 0o600)

    def test_reused_while_good(self):
        """A second call keeps the files it made."""
        first = ensure_certificates(self.directory, now=NOW)
        with open(first.cert_file, "rb") as f:
            pem = f.read()
        again = ensure_certificates(self.directory, now=NOW + datetime.timedelta(days=30))
        self.assertFalse(again.created)
        with open(again.cert_file, "rb") as f:
            self.assertEqual(f.read(), pem)

    def test_renewed_before_the_end(self):
        """Within L{RENEW_BEFORE} of its end the certificate is made anew, CA too."""
        first = ensure_certificates(self.directory, now=NOW)
        ca = load(first.ca_file)
        later = first.not_after - RENEW_BEFORE + datetime.timedelta(seconds=1)
        renewed = ensure_certificates(self.directory, now=later)
        self.assertTrue(renewed.created)
        self.assertNotEqual(load(renewed.ca_file).serial_number, ca.serial_number)
        self.assertGreater(renewed.not_after, first.not_after)
