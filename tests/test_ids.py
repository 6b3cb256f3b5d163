"""Tests for L{caracal.gateway.ids}."""

from __future__ import annotations

import os
import uuid

from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway import ids


class UUID4Tests(SynchronousTestCase):
    """L{ids.uuid4}: version 4 UUIDs in canonical form, from the system's random bytes."""

    def setUp(self):
        ids._forget()
        self.addCleanup(ids._forget)

    def test_canonical_version_4(self):
        """Every id reads back as the same version 4, RFC variant UUID."""
        for _ in range(3 * ids._DRAW // 16 + 5):
            text = ids.uuid4()
            parsed = uuid.UUID(text)
            self.assertEqual(str(parsed), text)
            self.assertEqual(parsed.version, 4)
            self.assertEqual(parsed.variant, uuid.RFC_4122)

    def test_same_as_uuid4_from_the_same_bytes(self):
        """The bytes drawn become exactly the ids C{uuid.uuid4} makes of them."""
        draws = []

        def urandom(size):
            draws.append(size)
            return bytes((index * 37 + 11 * len(draws)) % 256 for index in range(size))

        self.patch(ids.os, "urandom", urandom)
        made = [ids.uuid4() for _ in range(ids._DRAW // 16 + 1)]
        self.assertEqual(draws, [ids._DRAW, ids._DRAW], "one draw per 256 ids")
        first = bytes((index * 37 + 11) % 256 for index in range(ids._DRAW))
        expected = [
            str(uuid.UUID(bytes=first[offset : offset + 16], version=4))
            for offset in range(0, ids._DRAW, 16)
        ]
        self.assertEqual(made[:-1], expected)

    def test_unique(self):
        """Ids do not repeat, across draws."""
        made = {ids.uuid4() for _ in range(2_000)}
        self.assertEqual(len(made), 2_000)

    def test_fork_draws_afresh(self):
        """A forked child never hands out the ids its parent has left in the buffer."""
        ids.uuid4()  # the buffer now holds the next 255 ids
        reader, writer = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            try:
                os.write(writer, ids.uuid4().encode("ascii"))
            finally:
                os._exit(0)
        os.close(writer)
        try:
            from_child = os.read(reader, 64).decode("ascii")
        finally:
            os.close(reader)
            os.waitpid(child, 0)
        self.assertEqual(len(from_child), 36)
        self.assertNotEqual(from_child, ids.uuid4())


class RandomHexTests(SynchronousTestCase):
    """L{ids.random_hex}: fresh random bytes from the same buffered draws."""

    def setUp(self):
        ids._forget()
        self.addCleanup(ids._forget)

    def test_sizes_and_no_reuse(self):
        """Each call gives C{size} bytes in hex, never bytes another call got, across draws."""
        draws = []

        def urandom(size):
            draws.append(size)
            return bytes((index + 7 * len(draws)) % 256 for index in range(size))

        self.patch(ids.os, "urandom", urandom)
        made = [ids.random_hex(24) for _ in range(ids._DRAW // 24 + 1)]
        self.assertTrue(all(len(h) == 48 for h in made))
        self.assertEqual(draws, [ids._DRAW, ids._DRAW], "a new draw when the rest is too short")
        first = bytes((index + 7) % 256 for index in range(ids._DRAW))
        self.assertEqual(made[0], first[:24].hex())
        self.assertEqual(made[-1], bytes((index + 14) % 256 for index in range(24)).hex())
