"""Tests for kms.store.users: the SQLite user DB shared by the server and kmsctl."""

from __future__ import annotations

import hashlib
import sqlite3
import stat
import threading
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.auth.passwords import (
    KEY_SIZE,
    InvalidToken,
    StoreKey,
    parse_hash,
    parse_scram,
    scram_keys_from_salted,
)
from kms.store.users import (
    SCHEMA_VERSION,
    DuplicateUser,
    NoSuchUser,
    UserDB,
    UserRecord,
    check_password,
    make_secret,
    normalize_address,
    reversible_password,
    user_secrets,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class UserDBTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "users.db"
        self.key = StoreKey.load_or_create(self.dir / "store.key")
        self.clock = FakeClock()
        self.db = self.open()

    def open(self, **kwargs: object) -> UserDB:
        db = UserDB(self.path, now=self.clock, **kwargs)  # type: ignore[arg-type]
        self.addCleanup(db.close)
        return db

    def test_file_private_wal_versioned(self) -> None:
        """users.db is created 0600, in WAL mode, with the current schema version."""
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        raw = sqlite3.connect(self.path)
        self.addCleanup(raw.close)
        self.assertEqual(raw.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(raw.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)

    def test_add_and_get(self) -> None:
        """A user added with mixed case is found under any case, stored lower-case."""
        added = self.db.add("Alice@Example.TEST", "pw", "sha", self.key)
        self.assertEqual(added.address, "alice@example.test")
        got = self.db.get("ALICE@example.test")
        self.assertEqual(
            got, UserRecord("alice@example.test", "sha", added.secret, True, 1000.0, 1000.0, added.scram)
        )
        self.assertIsNone(self.db.get("bob@example.test"))

    def test_duplicate(self) -> None:
        self.db.add("a@example.test", "pw", "des", self.key)
        self.assertRaises(DuplicateUser, self.db.add, "A@example.test", "other", "sha", self.key)
        record = self.db.get("a@example.test")
        assert record is not None
        self.assertEqual(reversible_password(record, self.key), "pw")

    def test_secret_never_plaintext(self) -> None:
        """Neither storage puts the password in the database file."""
        self.db.add("d@example.test", "plain-des-password", "des", self.key)
        self.db.add("s@example.test", "plain-sha-password", "sha", self.key)
        self.db.close()
        content = b"".join(p.read_bytes() for p in self.dir.glob("users.db*"))
        self.assertNotIn(b"plain-des-password", content)
        self.assertNotIn(b"plain-sha-password", content)

    def test_repr_hides_secret(self) -> None:
        record = self.db.add("a@example.test", "pw", "des", self.key)
        self.assertNotIn(record.secret, repr(record))
        self.assertIn("a@example.test", repr(record))

    def test_set_password_changes_storage_and_time(self) -> None:
        """A new password may change the storage class; ``changed`` moves, ``created`` stays."""
        self.db.add("a@example.test", "old", "sha", self.key)
        self.clock.now = 2000.0
        record = self.db.set_password("a@example.test", "new", "des", self.key)
        self.assertEqual((record.storage, record.created, record.changed), ("des", 1000.0, 2000.0))
        self.assertEqual(self.db.get("a@example.test"), record)
        self.assertTrue(check_password(record, "new", self.key))
        self.assertFalse(check_password(record, "old", self.key))

    def test_set_password_unknown(self) -> None:
        self.assertRaises(NoSuchUser, self.db.set_password, "x@example.test", "pw", "sha", self.key)
        self.assertEqual(self.db.list(), [])

    def test_set_enabled(self) -> None:
        self.db.add("a@example.test", "pw", "sha", self.key)
        self.clock.now = 1500.0
        record = self.db.set_enabled("a@example.test", False)
        self.assertEqual((record.enabled, record.changed), (False, 1500.0))
        self.assertEqual(self.db.get("a@example.test"), record)
        self.assertTrue(self.db.set_enabled("a@example.test", True).enabled)
        self.assertRaises(NoSuchUser, self.db.set_enabled, "b@example.test", False)

    def test_delete(self) -> None:
        self.db.add("a@example.test", "pw", "sha", self.key)
        self.assertTrue(self.db.delete("A@EXAMPLE.TEST"))
        self.assertIsNone(self.db.get("a@example.test"))
        self.assertFalse(self.db.delete("a@example.test"))

    def test_list_sorted(self) -> None:
        for address in ("c@example.test", "a@example.test", "b@other.test"):
            self.db.add(address, "pw", "sha", self.key)
        expected = ["a@example.test", "b@other.test", "c@example.test"]
        self.assertEqual([r.address for r in self.db.list()], expected)

    def test_directory_user(self) -> None:
        """Directory users have no local secret and no local password check."""
        record = self.db.add("ad@example.test", None, "directory", self.key)
        self.assertEqual((record.storage, record.secret), ("directory", ""))
        self.assertFalse(check_password(record, "", self.key))
        self.assertFalse(check_password(record, "anything", self.key))
        self.assertIsNone(reversible_password(record, self.key))
        self.assertRaises(ValueError, self.db.add, "ad2@example.test", "pw", "directory", self.key)

    def test_bad_storage_and_empty_password(self) -> None:
        for password, storage in (("pw", "md5"), ("", "sha"), ("", "des"), (None, "sha")):
            self.assertRaises(ValueError, self.db.add, "a@example.test", password, storage, self.key)
        self.assertEqual(self.db.list(), [])

    def test_visible_to_second_connection(self) -> None:
        """A change by kmsctl's connection is seen at once by the server's."""
        other = self.open()
        other.add("a@example.test", "pw", "sha", self.key)
        self.assertIsNotNone(self.db.get("a@example.test"))
        other.delete("a@example.test")
        self.assertIsNone(self.db.get("a@example.test"))

    def test_reads_while_another_process_writes(self) -> None:
        """WAL: an open write transaction elsewhere does not block look-ups."""
        self.db.add("a@example.test", "pw", "sha", self.key)
        writer = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(writer.close)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE users SET enabled = 0")
        record = self.db.get("a@example.test")
        assert record is not None
        self.assertTrue(record.enabled)
        writer.execute("COMMIT")
        record = self.db.get("a@example.test")
        assert record is not None
        self.assertFalse(record.enabled)

    def test_locked_database_raises_operational_error(self) -> None:
        """A writer holding the lock past busy_timeout surfaces as sqlite3.OperationalError."""
        db = self.open(busy_timeout=0.05)
        writer = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(writer.close)
        writer.execute("BEGIN IMMEDIATE")
        e = self.assertRaises(sqlite3.OperationalError, db.add, "a@example.test", "pw", "sha", self.key)
        self.assertIn("locked", str(e))

    def test_threads_share_one_db(self) -> None:
        """Calls from many pool threads at once neither fail nor lose writes."""
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(10):
                    address = f"u{n}-{i}@example.test"
                    self.db.add(address, "pw", "des", self.key)
                    if self.db.get(address) is None:
                        raise AssertionError(address)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(self.db.list()), 60)

    def test_reopen_keeps_users(self) -> None:
        self.db.add("a@example.test", "pw", "des", self.key)
        self.db.close()
        record = self.open().get("a@example.test")
        assert record is not None
        self.assertTrue(check_password(record, "pw", self.key))

    def test_newer_schema_refused(self) -> None:
        """A DB from a newer kms is not silently used with an older schema."""
        self.db.close()
        raw = sqlite3.connect(self.path)
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        raw.commit()
        raw.close()
        e = self.assertRaises(sqlite3.DatabaseError, UserDB, self.path)
        self.assertIn("newer", str(e))

    def test_scram_keys_stored_with_every_password(self) -> None:
        """des and sha users get SCRAM keys; sha ones reuse the hash's salt and iterations; a new
        password brings new keys; directory users have none."""
        des = self.db.add("des@example.test", "pw", "des", self.key)
        sha = self.db.add("sha@example.test", "pw", "sha", self.key)
        ad = self.db.add("ad@example.test", None, "directory", self.key)
        assert des.scram is not None and sha.scram is not None
        self.assertIsNone(ad.scram)
        h = parse_hash(sha.secret)
        self.assertEqual(parse_scram(sha.scram), scram_keys_from_salted(h.salted, h.salt, h.iterations))
        des_keys = parse_scram(des.scram)
        salted = hashlib.pbkdf2_hmac("sha256", b"pw", des_keys.salt, des_keys.iterations)
        self.assertEqual(scram_keys_from_salted(salted, des_keys.salt, des_keys.iterations), des_keys)
        changed = self.db.set_password("des@example.test", "pw", "des", self.key)
        self.assertNotEqual(changed.scram, des.scram)
        self.assertNotIn(des.scram, repr(des))
        self.assertEqual(self.db.get("des@example.test"), changed)

    def test_user_secrets(self) -> None:
        des = self.db.add("des@example.test", "pw", "des", self.key)
        sha = self.db.add("sha@example.test", "pw", "sha", self.key)
        self.assertEqual(user_secrets(des, self.key).plaintext, "pw")
        self.assertEqual(user_secrets(des, self.key).scram, parse_scram(des.scram or ""))
        self.assertIsNone(user_secrets(sha, self.key).plaintext)
        self.assertNotIn("pw", repr(user_secrets(des, self.key)))
        old = UserRecord(sha.address, "sha", sha.secret, True, 0.0, 0.0, None)
        self.assertIsNone(user_secrets(old, self.key).scram)
        broken = UserRecord(sha.address, "sha", sha.secret, True, 0.0, 0.0, "SCRAM-SHA-256$1:$x:y")
        self.assertRaises(ValueError, user_secrets, broken, self.key)

    def test_migrates_version_1(self) -> None:
        """A store from before SCRAM keys opens, keeps its users (without keys) and gains the column."""
        old = self.dir / "old.db"
        raw = sqlite3.connect(old)
        raw.execute(
            "CREATE TABLE users (address TEXT PRIMARY KEY NOT NULL, storage TEXT NOT NULL CHECK"
            " (storage IN ('des', 'sha', 'directory')), secret TEXT NOT NULL, enabled INTEGER NOT NULL"
            " DEFAULT 1, created REAL NOT NULL, changed REAL NOT NULL) WITHOUT ROWID"
        )
        secret, _ = make_secret("a@example.test", "pw", "sha", self.key)
        raw.execute("INSERT INTO users VALUES ('a@example.test', 'sha', ?, 1, 1.0, 2.0)", (secret,))
        raw.execute("PRAGMA user_version = 1")
        raw.commit()
        raw.close()
        db = UserDB(old)
        self.addCleanup(db.close)
        record = db.get("a@example.test")
        assert record is not None
        self.assertIsNone(record.scram)
        self.assertTrue(check_password(record, "pw", self.key))
        self.assertIsNotNone(db.set_password("a@example.test", "pw", "sha", self.key).scram)
        raw = sqlite3.connect(old)
        self.addCleanup(raw.close)
        self.assertEqual(raw.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(SCHEMA_VERSION, 2)

    def test_rejects_bad_address(self) -> None:
        self.assertRaises(ValueError, self.db.add, "no-at-sign", "pw", "sha", self.key)
        self.assertRaises(ValueError, self.db.get, "a b@example.test")


class PasswordCheckTests(TestCase):
    def setUp(self) -> None:
        self.key = StoreKey(bytes(KEY_SIZE))

    def record(self, address: str, password: str, storage: str) -> UserRecord:
        secret, scram = make_secret(address, password, storage, self.key)
        return UserRecord(address, storage, secret, True, 0.0, 0.0, scram)

    def test_des(self) -> None:
        r = self.record("a@example.test", "Pässwörd", "des")
        self.assertTrue(check_password(r, "Pässwörd", self.key))
        self.assertFalse(check_password(r, "pässwörd", self.key))
        self.assertEqual(reversible_password(r, self.key), "Pässwörd")

    def test_sha(self) -> None:
        r = self.record("a@example.test", "pw", "sha")
        self.assertTrue(check_password(r, "pw", self.key))
        self.assertFalse(check_password(r, "pw ", self.key))
        self.assertIsNone(reversible_password(r, self.key))

    def test_des_secret_moved_to_other_user(self) -> None:
        """Copying alice's des secret onto mallory's row does not give mallory alice's password."""
        alice = self.record("alice@example.test", "pw", "des")
        mallory = UserRecord("mallory@example.test", "des", alice.secret, True, 0.0, 0.0)
        self.assertRaises(InvalidToken, check_password, mallory, "pw", self.key)

    def test_des_with_other_key(self) -> None:
        """A changed store key is an error the checker reports, not a wrong password."""
        r = self.record("a@example.test", "pw", "des")
        self.assertRaises(InvalidToken, check_password, r, "pw", StoreKey(b"\1" * KEY_SIZE))


class AddressTests(TestCase):
    def test_valid(self) -> None:
        for text, expected in (
            ("Alice@Example.Test", "alice@example.test"),
            ("first.last+tag@sub.example.test", "first.last+tag@sub.example.test"),
            ("o'brien@x-y.example", "o'brien@x-y.example"),
            ("a@localhost", "a@localhost"),
            ("ü@bücher.example", "ü@bücher.example"),
        ):
            self.assertEqual(normalize_address(text), expected)

    def test_invalid(self) -> None:
        for bad in (
            "",
            "alice",
            "@example.test",
            "alice@",
            "a@b@example.test",
            "a b@example.test",
            "a@example.test ",
            "a\t@example.test",
            "a\r\n@example.test",
            "a\x00@example.test",
            "a/b@example.test",
            "..@example.test",
            ".a@example.test",
            "a.@example.test",
            "a..b@example.test",
            "a@-example.test",
            "a@example-.test",
            "a@example..test",
            "a@.example.test",
            "a@exa_mple.test",
            "a\\b@example.test",
            '"a"@example.test',
            "x" * 65 + "@example.test",
            "a@" + "b" * 64 + ".test",
            "a@" + ".".join(["abcdefgh"] * 30),
        ):
            self.assertRaises(ValueError, normalize_address, bad)

    @given(st.text(max_size=80) | st.builds("{}@{}".format, st.text(max_size=20), st.text(max_size=20)))
    def test_canonical_or_value_error(self, text: str) -> None:
        """Any input gives ValueError or a canonical form that is stable and safe to use as a key."""
        try:
            address = normalize_address(text)
        except ValueError:
            return
        self.assertEqual(normalize_address(address), address)
        self.assertEqual(address, address.lower())
        self.assertEqual(address.count("@"), 1)
        self.assertFalse(any(c.isspace() or not c.isprintable() or c in '/\\"' for c in address))
