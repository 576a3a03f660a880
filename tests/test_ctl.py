"""Tests for kms.ctl (kmsctl): in-process with captured stdio, and as a real subprocess."""

from __future__ import annotations

import getpass
import io
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

import kms
from kms.auth.passwords import StoreKey
from kms.ctl import main
from kms.store.users import UserDB, UserRecord, check_password
from tests.support.server import TEST_STORE_LIMITS

MINIMAL = """\
[server]
hostname = "mail.example.test"
[domains]
local = ["example.test", "second.test"]
[store]
path = "store"
""" + TEST_STORE_LIMITS  # small limits: kmsctl warns on stderr below the soft limit (1GB by default)

PROJECT_ROOT = Path(kms.__file__).resolve().parent.parent


class CtlTestCase(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.config = self.dir / "kms.toml"
        self.store = self.dir / "store"
        self.write_config()
        old_umask = os.umask(0o022)
        self.addCleanup(os.umask, old_umask)

    def write_config(self, extra: str = "") -> None:
        self.config.write_text(MINIMAL + extra)

    def run_ctl(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        """main() with stdio captured: (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", io.StringIO(stdin))
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(["--config", str(self.config), *argv])
        return code, out.getvalue(), err.getvalue()

    def record(self, address: str) -> UserRecord | None:
        db = UserDB(self.store / "users.db")
        try:
            return db.get(address)
        finally:
            db.close()

    def key(self) -> StoreKey:
        return StoreKey.load_or_create(self.store / "store.key")


class UserAddTests(CtlTestCase):
    def test_add_password_stdin(self) -> None:
        """The first stdin line is the password; storage defaults to security.password_storage (des)."""
        code, out, err = self.run_ctl(
            "user", "add", "Alice@Example.TEST", "--password-stdin", stdin="s3cret pw\n"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertIn("alice@example.test", out)
        record = self.record("alice@example.test")
        assert record is not None
        self.assertEqual(record.storage, "des")
        self.assertTrue(check_password(record, "s3cret pw", self.key()))

    def test_store_created_private(self) -> None:
        """The store folder appears 0750 on first use; the DB and key inside are 0600."""
        self.assertFalse(self.store.exists())
        self.run_ctl("user", "add", "a@example.test", "--password-stdin", stdin="pw\n")
        self.assertEqual(stat.S_IMODE(self.store.stat().st_mode), 0o750)
        for name in ("users.db", "store.key"):
            self.assertEqual(stat.S_IMODE((self.store / name).stat().st_mode), 0o600, name)

    def test_storage_option_and_config_default(self) -> None:
        self.run_ctl("user", "add", "a@example.test", "--password-stdin", "--storage", "sha", stdin="pw\n")
        self.write_config('[security]\npassword_storage = "sha"\n')
        self.run_ctl("user", "add", "b@example.test", "--password-stdin", stdin="pw\n")
        for address in ("a@example.test", "b@example.test"):
            record = self.record(address)
            assert record is not None
            self.assertEqual(record.storage, "sha")
            self.assertTrue(check_password(record, "pw", self.key()))

    def test_asks_twice(self) -> None:
        """Without --password-stdin the password is asked twice on the terminal."""
        answers = iter(["typed", "typed"])
        self.patch(getpass, "getpass", lambda prompt="": next(answers))
        code, _, err = self.run_ctl("user", "add", "a@example.test")
        self.assertEqual((code, err), (0, ""))
        record = self.record("a@example.test")
        assert record is not None
        self.assertTrue(check_password(record, "typed", self.key()))

    def test_mismatch(self) -> None:
        answers = iter(["one", "two"])
        self.patch(getpass, "getpass", lambda prompt="": next(answers))
        code, out, err = self.run_ctl("user", "add", "a@example.test")
        self.assertEqual(code, 1)
        self.assertIn("do not match", err)
        self.assertIsNone(self.record("a@example.test"))

    def test_empty_password(self) -> None:
        code, _, err = self.run_ctl("user", "add", "a@example.test", "--password-stdin", stdin="\n")
        self.assertEqual(code, 1)
        self.assertIn("empty password", err)
        self.assertIsNone(self.record("a@example.test"))

    def test_domain_must_be_local(self) -> None:
        code, _, err = self.run_ctl("user", "add", "a@elsewhere.test", "--password-stdin", stdin="pw\n")
        self.assertEqual(code, 1)
        self.assertIn("elsewhere.test is not a local domain", err)
        self.assertEqual(self.run_ctl("user", "add", "a@second.test", "--password-stdin", stdin="pw\n")[0], 0)

    def test_bad_address(self) -> None:
        code, _, err = self.run_ctl("user", "add", "not-an-address", "--password-stdin", stdin="pw\n")
        self.assertEqual(code, 1)
        self.assertIn("exactly one '@'", err)

    def test_duplicate_fails_before_asking(self) -> None:
        """An existing user is reported before the password is asked, and keeps its password."""
        self.run_ctl("user", "add", "a@example.test", "--password-stdin", stdin="first\n")
        self.patch(getpass, "getpass", lambda prompt="": self.fail("password asked"))
        code, _, err = self.run_ctl("user", "add", "A@example.test")
        self.assertEqual(code, 1)
        self.assertIn("already exists", err)
        record = self.record("a@example.test")
        assert record is not None
        self.assertTrue(check_password(record, "first", self.key()))

    def test_directory_user(self) -> None:
        code, _, _ = self.run_ctl("user", "add", "ad@example.test", "--source", "directory")
        self.assertEqual(code, 0)
        record = self.record("ad@example.test")
        assert record is not None
        self.assertEqual((record.storage, record.secret), ("directory", ""))
        code, _, err = self.run_ctl(
            "user", "add", "ad2@example.test", "--source", "directory", "--password-stdin"
        )
        self.assertEqual(code, 1)
        self.assertIn("no local password", err)


class OtherVerbTests(CtlTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.run_ctl("user", "add", "alice@example.test", "--password-stdin", stdin="old\n")
        self.run_ctl("user", "add", "ad@example.test", "--source", "directory")

    def test_passwd(self) -> None:
        code, _, err = self.run_ctl(
            "user", "passwd", "alice@example.test", "--password-stdin", "--storage", "sha", stdin="new\n"
        )
        self.assertEqual((code, err), (0, ""))
        record = self.record("alice@example.test")
        assert record is not None
        self.assertEqual(record.storage, "sha")
        self.assertTrue(check_password(record, "new", self.key()))
        self.assertFalse(check_password(record, "old", self.key()))

    def test_passwd_unknown_and_directory(self) -> None:
        code, _, err = self.run_ctl("user", "passwd", "bob@example.test", "--password-stdin", stdin="x\n")
        self.assertEqual(code, 1)
        self.assertIn("no such user", err)
        code, _, err = self.run_ctl("user", "passwd", "ad@example.test", "--password-stdin", stdin="x\n")
        self.assertEqual(code, 1)
        self.assertIn("directory user", err)

    def test_del(self) -> None:
        self.assertEqual(self.run_ctl("user", "del", "Alice@example.test")[0], 0)
        self.assertIsNone(self.record("alice@example.test"))
        code, _, err = self.run_ctl("user", "del", "alice@example.test")
        self.assertEqual(code, 1)
        self.assertIn("no such user", err)

    def test_list(self) -> None:
        self.run_ctl("user", "disable", "ad@example.test")
        code, out, _ = self.run_ctl("user", "list")
        self.assertEqual(code, 0)
        rows = [line.split() for line in out.splitlines()]
        self.assertEqual(
            rows,
            [
                ["ADDRESS", "STORAGE", "ENABLED"],
                ["ad@example.test", "directory", "no"],
                ["alice@example.test", "des", "yes"],
            ],
        )

    def test_show_never_shows_secret(self) -> None:
        code, out, _ = self.run_ctl("user", "show", "ALICE@example.test")
        self.assertEqual(code, 0)
        record = self.record("alice@example.test")
        assert record is not None
        self.assertNotIn(record.secret, out)
        self.assertNotIn(record.secret.split("$")[2], out)
        self.assertNotIn("old", out)
        self.assertIn("address: alice@example.test", out)
        self.assertIn("storage: des", out)
        self.assertIn("enabled: yes", out)
        self.assertEqual(self.run_ctl("user", "show", "nobody@example.test")[0], 1)

    def test_enable_disable(self) -> None:
        self.assertEqual(self.run_ctl("user", "disable", "alice@example.test")[0], 0)
        record = self.record("alice@example.test")
        assert record is not None
        self.assertFalse(record.enabled)
        self.assertEqual(self.run_ctl("user", "enable", "alice@example.test")[0], 0)
        record = self.record("alice@example.test")
        assert record is not None
        self.assertTrue(record.enabled)
        self.assertEqual(self.run_ctl("user", "disable", "nobody@example.test")[0], 1)

    def test_users_of_a_removed_domain_stay_manageable(self) -> None:
        self.run_ctl("user", "add", "x@second.test", "--password-stdin", stdin="pw\n")
        self.config.write_text(MINIMAL.replace(', "second.test"', ""))
        self.assertEqual(self.run_ctl("user", "show", "x@second.test")[0], 0)
        self.assertEqual(self.run_ctl("user", "del", "x@second.test")[0], 0)

    def test_server_sees_changes_at_once(self) -> None:
        """kmsctl works while the server holds the DB open, and the server sees the result."""
        server_db = UserDB(self.store / "users.db")
        self.addCleanup(server_db.close)
        self.run_ctl("user", "add", "new@example.test", "--password-stdin", stdin="pw\n")
        self.assertIsNotNone(server_db.get("new@example.test"))


class MethodsAndStorageTests(CtlTestCase):
    """user show explains the storage matrix; passwd converts; check-config warns about users."""

    def setUp(self) -> None:
        super().setUp()
        self.write_config('[security]\nmethods = ["CRAM-MD5", "SCRAM-SHA-256", "LOGIN"]\n')
        self.run_ctl("user", "add", "des@example.test", "--storage", "des", "--password-stdin", stdin="pw\n")
        self.run_ctl("user", "add", "sha@example.test", "--storage", "sha", "--password-stdin", stdin="pw\n")
        self.run_ctl("user", "add", "ad@example.test", "--source", "directory")

    def show(self, address: str) -> list[str]:
        code, out, err = self.run_ctl("user", "show", address)
        self.assertEqual((code, err), (0, ""))
        return [line for line in out.splitlines() if line.startswith(("scram:", "methods:", "cannot"))]

    def test_show_methods(self) -> None:
        """SCRAM-SHA-256 first when enabled; plaintext commands follow LOGIN; APOP for des only."""
        self.assertEqual(
            self.show("des@example.test"),
            ["scram:   yes", "methods: CRAM-MD5, SCRAM-SHA-256, LOGIN, IMAP-LOGIN, USER/PASS, APOP"],
        )
        self.assertEqual(
            self.show("sha@example.test"),
            [
                "scram:   yes",
                "methods: SCRAM-SHA-256, LOGIN, IMAP-LOGIN, USER/PASS",
                "cannot use CRAM-MD5: password stored one-way",
                "cannot use APOP: password stored one-way",
            ],
        )
        directory = "directory users log in with a password checked by the directory"
        self.assertEqual(
            self.show("ad@example.test"),
            [
                "scram:   no",
                "methods: LOGIN, IMAP-LOGIN, USER/PASS",
                f"cannot use CRAM-MD5: {directory}",
                f"cannot use SCRAM-SHA-256: {directory}",
                f"cannot use APOP: {directory}",
            ],
        )

    def test_passwd_keeps_or_converts_storage(self) -> None:
        """Without --storage the class stays; --storage converts; --keep-password turns a des user
        into a sha one without knowing the password, never the other way round."""
        self.assertEqual(
            self.run_ctl("user", "passwd", "sha@example.test", "--password-stdin", stdin="n\n")[0], 0
        )
        record = self.record("sha@example.test")
        assert record is not None
        self.assertEqual(record.storage, "sha")
        code, out, _ = self.run_ctl(
            "user", "passwd", "des@example.test", "--keep-password", "--storage", "sha"
        )
        self.assertEqual((code, out), (0, "password changed for des@example.test (sha)\n"))
        record = self.record("des@example.test")
        assert record is not None and record.scram is not None
        self.assertEqual(record.storage, "sha")
        self.assertTrue(check_password(record, "pw", self.key()))
        code, _, err = self.run_ctl(
            "user", "passwd", "des@example.test", "--keep-password", "--storage", "des"
        )
        self.assertEqual(code, 1)
        self.assertIn("stored one-way and cannot be kept", err)
        code, _, err = self.run_ctl(
            "user", "passwd", "sha@example.test", "--keep-password", "--password-stdin"
        )
        self.assertEqual(code, 1)
        code, _, _ = self.run_ctl(
            "user", "passwd", "des@example.test", "--storage", "des", "--password-stdin", stdin="back\n"
        )
        record = self.record("des@example.test")
        assert record is not None
        self.assertEqual((code, record.storage), (0, "des"))
        self.assertTrue(check_password(record, "back", self.key()))

    def test_keep_password_adds_scram_keys(self) -> None:
        """A des user from before SCRAM keys gets them without a new password."""
        raw = sqlite3.connect(self.store / "users.db")
        raw.execute("UPDATE users SET scram = NULL")
        raw.commit()
        raw.close()
        self.assertEqual(self.show("des@example.test")[0], "scram:   no")
        self.assertEqual(self.run_ctl("user", "passwd", "des@example.test", "--keep-password")[0], 0)
        self.assertEqual(self.show("des@example.test")[0], "scram:   yes")

    def test_check_config_warns_about_existing_users(self) -> None:
        code, out, _ = self.run_ctl("check-config")
        self.assertEqual(code, 0)
        self.assertIn(
            "warning: security.methods: CRAM-MD5 cannot work for 1 existing sha user; "
            "clients choosing them will fail to log in",
            out,
        )
        raw = sqlite3.connect(self.store / "users.db")
        raw.execute("UPDATE users SET scram = NULL")
        raw.commit()
        raw.close()
        self.write_config('[security]\nmethods = ["CRAM-MD5", "SCRAM-SHA-256"]\npassword_storage = "sha"\n')
        out = self.run_ctl("check-config")[1]
        self.assertIn('CRAM-MD5 cannot work for new passwords (password_storage = "sha")', out)
        self.assertIn("none of CRAM-MD5, SCRAM-SHA-256 works for 1 existing sha user without SCRAM keys", out)
        self.assertIn("SCRAM-SHA-256 cannot work for 1 existing des user without SCRAM keys", out)

    def test_check_config_without_users_db(self) -> None:
        (self.store / "users.db").unlink()
        self.write_config("[security]\nmethods = []\n")
        code, out, _ = self.run_ctl("check-config")
        self.assertEqual(code, 0)
        self.assertIn("warning: security.methods: empty", out)
        self.assertFalse((self.store / "users.db").exists())


class CheckConfigTests(CtlTestCase):
    def test_ok(self) -> None:
        code, out, err = self.run_ctl("check-config")
        self.assertEqual((code, out, err), (0, "configuration OK\n", ""))

    def test_warnings(self) -> None:
        self.write_config('[security]\npassword_storage = "sha"\nmethods = ["CRAM-MD5", "PLAIN"]\n')
        code, out, _ = self.run_ctl("check-config")
        self.assertEqual(code, 0)
        self.assertIn("configuration OK", out)
        self.assertIn("warning: security.methods", out)

    def test_problems_one_per_line(self) -> None:
        self.config.write_text('[server]\nhostname = ""\n[domains]\nlocal = []\n[store]\nbogus = 1\n')
        code, out, err = self.run_ctl("check-config")
        self.assertEqual(code, 1)
        self.assertNotIn("configuration OK", out)
        lines = err.splitlines()
        self.assertTrue(any(line.startswith("server.hostname") for line in lines), err)
        self.assertTrue(any(line.startswith("domains.local") for line in lines), err)
        self.assertTrue(any("store.bogus" in line for line in lines), err)

    def test_runtime_problems_fail(self) -> None:
        """A valid file naming a missing certificate: OK as a file, but the server could not start."""
        self.write_config('[tls]\ncertificate = "missing.pem"\nprivate_key = "missing.key"\n')
        code, out, err = self.run_ctl("check-config")
        self.assertEqual(code, 1)
        self.assertIn("configuration OK", out)
        self.assertIn("tls.certificate", err)

    def test_missing_config_file(self) -> None:
        self.config.unlink()
        code, _, err = self.run_ctl("user", "list")
        self.assertEqual(code, 1)
        self.assertIn("cannot read", err)


class UsageTests(CtlTestCase):
    def test_every_verb_has_help(self) -> None:
        for verb in (
            [],
            ["check-config"],
            ["user"],
            ["user", "add"],
            ["user", "passwd"],
            ["user", "del"],
            ["user", "list"],
            ["user", "show"],
            ["user", "enable"],
            ["user", "disable"],
        ):
            code, out, _ = self.run_ctl(*verb, "--help")
            self.assertEqual(code, 0, verb)
            self.assertIn("usage: kmsctl", out)

    def test_usage_error(self) -> None:
        code, _, err = self.run_ctl("user", "frobnicate")
        self.assertEqual(code, 2)
        self.assertIn("invalid choice", err)
        self.assertEqual(self.run_ctl()[0], 2)

    def test_store_parent_missing(self) -> None:
        self.config.write_text(MINIMAL.replace('path = "store"', 'path = "missing/store"'))
        code, _, err = self.run_ctl("user", "list")
        self.assertEqual(code, 1)
        self.assertIn("does not exist", err)


class SubprocessTests(CtlTestCase):
    def kmsctl(self, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        return subprocess.run(
            [sys.executable, "-m", "kms.ctl", "--config", str(self.config), *argv],
            input=stdin,
            capture_output=True,
            cwd=PROJECT_ROOT,
            env=env,
            timeout=60,
        )

    def test_add_list_and_check(self) -> None:
        """A real kmsctl process adds a user from stdin; another lists it; the password checks."""
        added = self.kmsctl(
            "user", "add", "sub@example.test", "--password-stdin", "--storage", "sha", stdin=b"from-a-pipe\n"
        )
        self.assertEqual((added.returncode, added.stderr), (0, b""))
        listed = self.kmsctl("user", "list")
        self.assertEqual(listed.returncode, 0)
        self.assertIn(b"sub@example.test  sha", listed.stdout)
        record = self.record("sub@example.test")
        assert record is not None
        self.assertTrue(check_password(record, "from-a-pipe", self.key()))

    def test_error_exit_status(self) -> None:
        failed = self.kmsctl("user", "del", "ghost@example.test")
        self.assertEqual(failed.returncode, 1)
        self.assertIn(b"no such user", failed.stderr)
        self.assertEqual(failed.stdout, b"")
