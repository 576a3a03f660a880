"""POP3 and IMAP end to end: mail arrives over SMTP and is read with clients we did not write.

poplib, imaplib, curl and fetchmail talk to the real service tree on 127.0.0.1; what they get is
compared byte for byte with what was sent and with each other.
"""

from __future__ import annotations

import gc
import imaplib
import os
import poplib
import shutil
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.server import RunningServer, add_user, write_config

PASSWORD = "correct horse battery"
BODY = (
    "Subject: Grüße\r\nFrom: Jörg <joerg@remote.test>\r\nTo: alice@example.test\r\n"
    "Message-ID: <m1@remote.test>\r\n\r\n"
    "first line\r\n.leading dot\r\n..two dots\r\n" + "x" * 2000 + "\r\nÄpfel\r\n"
).encode()
LISTENERS = ("smtp", "pop3", "pop3s", "imap", "imaps")


class MailAccessTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.dir = Path(self.mktemp()).absolute()
        listeners = {name: "tcp:0:interface=127.0.0.1" for name in LISTENERS}
        path = self.config_path = write_config(self.dir, listeners=listeners, max_size="3MB")
        self.server = RunningServer(path)
        add_user(self.server.config, "alice@example.test", PASSWORD, "des")
        add_user(self.server.config, "bob@example.test", PASSWORD, "sha")
        yield self.server.start()
        self.addCleanup(lambda: self.server.stop())  # the server running then (a test may restart it)
        self.cafile = self.dir / "tls" / "server.pem"
        self.tls = ssl.create_default_context(cafile=str(self.cafile))

    def test_startup_heap_frozen(self) -> None:
        """Once started, the server has moved its start-up objects out of the cyclic collector's
        walks (kms.service, once per process: a full collection then skips them)."""
        self.assertGreater(gc.get_freeze_count(), 10_000)

    def deliver(self, body: bytes = BODY, to: str = "alice@example.test") -> None:
        """Blocking: one message over SMTP (call from a thread)."""
        with smtplib.SMTP("127.0.0.1", self.server.port("smtp"), timeout=10) as s:
            s.sendmail("joerg@remote.test", [to], body, mail_options=["SMTPUTF8", "BODY=8BITMIME"])

    def stored(self, address: str = "alice@example.test") -> list[bytes]:
        """Every stored message of the user's INBOX (new/ or cur/) in wire form, oldest first."""
        root = self.server.maildir(address)
        files = sorted([*(root / "new").iterdir(), *(root / "cur").iterdir()], key=lambda p: p.name)
        return [f.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for f in files]

    def imap(self, port_name: str = "imap", user: str = "alice@example.test") -> imaplib.IMAP4:
        if port_name == "imaps":
            m: imaplib.IMAP4 = imaplib.IMAP4_SSL("127.0.0.1", self.server.port("imaps"), ssl_context=self.tls)
        else:
            m = imaplib.IMAP4("127.0.0.1", self.server.port("imap"))
            m.starttls(ssl_context=self.tls)
        m.login(user, PASSWORD)
        return m

    def pop3(self, port_name: str = "pop3", user: str = "alice@example.test") -> poplib.POP3:
        if port_name == "pop3s":
            p: poplib.POP3 = poplib.POP3_SSL(
                "127.0.0.1", self.server.port("pop3s"), context=self.tls, timeout=10
            )
        else:
            p = poplib.POP3("127.0.0.1", self.server.port("pop3"), timeout=10)
            p.stls(context=self.tls)
        p.user(user)
        p.pass_(PASSWORD)
        return p

    def pop3_when_unlocked(self) -> poplib.POP3:
        """Log in again after a dropped session: until the server has seen the drop, [IN-USE]."""
        for _ in range(50):
            try:
                return self.pop3()
            except poplib.error_proto as e:
                if b"[IN-USE]" not in e.args[0]:
                    raise
                time.sleep(0.05)
        return self.pop3()

    # --- the same bytes everywhere ---------------------------------------------------------------

    @inlineCallbacks
    def test_smtp_to_imap_and_pop3_byte_identical(self):  # type: ignore[no-untyped-def]
        """What SMTP stored is what IMAP BODY[] and POP3 RETR return, byte for byte (CRLF form)."""

        def client() -> tuple[bytes, bytes, int]:
            self.deliver()
            m = self.imap()
            m.select("INBOX")
            typ, data = m.fetch("1", "(RFC822.SIZE BODY.PEEK[])")
            by_imap = data[0][1]
            size = int(data[0][0].split(b"RFC822.SIZE ")[1].split()[0])
            m.logout()
            p = self.pop3()
            _, lines, _ = p.retr(1)
            p.quit()
            return by_imap, b"\r\n".join(lines) + b"\r\n", size

        by_imap, by_pop3, size = yield deferToThread(client)
        [expected] = self.stored()
        self.assertEqual(by_imap, expected)
        self.assertEqual(by_pop3, expected)
        self.assertEqual(size, len(expected))
        self.assertTrue(expected.endswith(BODY.split(b"\r\n\r\n", 1)[1]))
        self.assertIn(b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n", expected)

    # --- POP3 ------------------------------------------------------------------------------------

    @inlineCallbacks
    def test_pop3_deletes_only_after_quit(self):  # type: ignore[no-untyped-def]
        """DELE then a dropped connection deletes nothing; DELE then QUIT deletes exactly that message."""

        def client() -> tuple[int, int, list[bytes], list[bytes]]:
            for n in range(3):
                self.deliver(BODY.replace(b"first line", b"message %d" % n))
            p = self.pop3()
            uidl_before = p.uidl()[1]
            p.dele(1)
            p.close()  # drops the connection without QUIT: the UPDATE state never comes
            p = self.pop3_when_unlocked()
            count_after_drop = p.stat()[0]
            p.dele(2)
            p.quit()
            p = self.pop3()
            count_after_quit = p.stat()[0]
            uidl_after = p.uidl()[1]
            p.quit()
            return count_after_drop, count_after_quit, uidl_before, uidl_after

        after_drop, after_quit, before, after = yield deferToThread(client)
        self.assertEqual(after_drop, 3)
        self.assertEqual(after_quit, 2)
        ids_before = [line.split()[1] for line in before]
        ids_after = [line.split()[1] for line in after]
        self.assertEqual(ids_after, [ids_before[0], ids_before[2]])  # stable across sessions

    @inlineCallbacks
    def test_pop3s_maildrop_is_exclusive(self):  # type: ignore[no-untyped-def]
        """A second POP3 session of the same user gets -ERR [IN-USE] while the first holds the maildrop."""

        def client() -> str:
            first = self.pop3("pop3s")
            try:
                self.pop3("pop3s")
            except poplib.error_proto as e:
                return str(e)
            finally:
                first.quit()
            return "no error"

        error = yield deferToThread(client)
        self.assertIn("[IN-USE]", error)

    @inlineCallbacks
    def test_pop3_wrong_password_and_unknown_user_alike(self):  # type: ignore[no-untyped-def]
        def attempt(user: str) -> str:
            p = poplib.POP3("127.0.0.1", self.server.port("pop3"), timeout=10)
            p.user(user)
            try:
                p.pass_("wrong")
            except poplib.error_proto as e:
                return str(e)
            finally:
                p.close()
            return "accepted"

        wrong = yield deferToThread(attempt, "alice@example.test")
        unknown = yield deferToThread(attempt, "nobody@example.test")
        self.assertEqual(wrong, unknown)
        self.assertIn("[AUTH]", wrong)

    # --- IMAP ------------------------------------------------------------------------------------

    @inlineCallbacks
    def test_imap_session(self):  # type: ignore[no-untyped-def]
        """LIST (SPECIAL-USE), SELECT codes, SEARCH, STORE, COPY+COPYUID, UID EXPUNGE, APPEND+APPENDUID."""

        def client() -> dict[str, object]:
            self.deliver()
            self.deliver(BODY.replace(b"Subject: Gr\xc3\xbc\xc3\x9fe", b"Subject: second"))
            m = self.imap("imaps")
            out: dict[str, object] = {}
            out["list"] = m.list()[1]
            typ, data = m.select("INBOX")
            out["exists"] = int(data[0])
            out["uidvalidity"] = m.response("UIDVALIDITY")[1]
            out["uidnext"] = m.response("UIDNEXT")[1]
            out["search"] = m.uid("SEARCH", None, "SUBJECT", "second")[1]
            out["store"] = m.store("1", "+FLAGS", "(\\Flagged)")[1]
            out["copy"] = m.copy("1", "Trash")
            m.store("1", "+FLAGS", "(\\Deleted)")
            out["uid_expunge"] = m.uid("EXPUNGE", "1")
            out["append"] = m.append("Drafts", "(\\Draft)", None, b"Subject: draft\r\n\r\nbody\r\n")
            out["status"] = m.status("Trash", "(MESSAGES UIDNEXT)")[1]
            out["flags"] = m.fetch("1", "(FLAGS)")[1]
            m.logout()
            return out

        out = yield deferToThread(client)
        listing = b"\n".join(out["list"])  # type: ignore[arg-type]
        for folder, attribute in (
            (b"Sent", b"\\Sent"),
            (b"Drafts", b"\\Drafts"),
            (b"Trash", b"\\Trash"),
            (b"Junk", b"\\Junk"),
        ):
            line = next(
                x for x in out["list"] if x.endswith(b' "' + folder + b'"') or x.endswith(b" " + folder)
            )
            self.assertIn(attribute, line, listing)
        self.assertEqual(out["exists"], 2)
        self.assertNotEqual(out["uidvalidity"], [None])
        self.assertEqual(out["uidnext"], [b"3"])
        self.assertEqual(out["search"], [b"2"])
        self.assertIn(b"COPYUID", out["copy"][1][0])  # type: ignore[index]
        self.assertEqual(out["uid_expunge"][0], "OK")  # type: ignore[index]
        self.assertIn(b"APPENDUID", out["append"][1][0])  # type: ignore[index]
        self.assertIn(b"MESSAGES 1", out["status"][0])  # type: ignore[index]
        self.assertIn(b"FLAGS ()", out["flags"][0])  # type: ignore[index]  # the old 2nd is now 1, unflagged

    @inlineCallbacks
    def test_imap_after_a_restart_reads_details_from_the_index(self):  # type: ignore[no-untyped-def]
        """A restarted server opens INBOX from its index without the header sections and metas
        (kms.store.index.FolderDetails); ENVELOPE, header fields, header SEARCH and COPY read
        them then and answer exactly what the server that indexed the messages answered."""
        subjects = [b"alpha", b"beta", b"gamma"]

        def deliver_all() -> None:
            for subject in subjects:
                self.deliver(BODY.replace(b"Subject: Gr\xc3\xbc\xc3\x9fe", b"Subject: " + subject))

        def answers() -> list[object]:
            m = self.imap()
            m.select("INBOX")
            out: list[object] = [
                m.fetch("1:*", "(FLAGS RFC822.SIZE)")[1],
                m.fetch("1:*", "(ENVELOPE BODYSTRUCTURE)")[1],
                m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])")[1],
                m.uid("SEARCH", None, "SUBJECT", "beta")[1],
                m.uid("SEARCH", None, "SENTSINCE", "1-Jan-2000")[1],
            ]
            m.logout()
            return out

        def copied() -> object:
            m = self.imap()
            m.select("INBOX")
            m.copy("1:*", "Trash")
            m.select("Trash")
            envelopes = m.fetch("1:*", "(ENVELOPE BODYSTRUCTURE)")[1]
            m.logout()
            return envelopes

        yield deferToThread(deliver_all)
        before = yield deferToThread(answers)
        envelopes = b"".join(x if isinstance(x, bytes) else b"".join(x) for x in before[1])  # type: ignore[attr-defined]
        self.assertIn(b'"beta"', envelopes)
        yield self.server.stop()
        self.server = RunningServer(self.config_path)
        yield self.server.start()
        after = yield deferToThread(answers)
        self.assertEqual(after, before)
        self.assertEqual(after[3], [b"2"])  # type: ignore[index]
        self.assertEqual(after[4], [b"1 2 3"])  # type: ignore[index]
        trash = yield deferToThread(copied)
        self.assertEqual(trash, before[1])  # type: ignore[index]  # Trash was empty: the same numbers

    @inlineCallbacks
    def test_stop_waits_for_a_folder_operation_in_flight(self):  # type: ignore[no-untyped-def]
        """Stopping while an operation holds a folder's lock: the folder is closed (snapshot and
        all) when the operation ends, in a pool that still runs.  MultiService stops its children
        at once; with the pool stopped first, the close never ran and the stop hung (a flaky
        tests.test_space_e2e run showed it)."""

        def open_inbox() -> None:
            self.deliver()
            m = self.imap()
            m.select("INBOX")
            m.logout()

        yield deferToThread(open_inbox)
        factory = self.server.service.getServiceNamed("imap").factory
        while not hasattr(factory, "accounts"):
            factory = factory.wrappedFactory
        store = factory.accounts.__self__
        [folder] = [f for f in store._folders.values() if f.name == "INBOX"]
        operation: Deferred[None] = Deferred()
        folder.lock.run(lambda: operation)
        stopping = self.server.stop()
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(stopping.called)  # waiting for the operation
        operation.callback(None)
        yield stopping
        self.assertFalse(folder.lock.locked)

    @inlineCallbacks
    def test_imap_idle_sees_smtp_delivery_and_other_sessions_expunge(self):  # type: ignore[no-untyped-def]
        """A session in IDLE hears EXISTS when SMTP delivers; a second session's EXPUNGE reaches it."""

        def client() -> tuple[bytes, list[bytes]]:
            self.deliver()
            a = self.imap()
            a.select("INBOX")
            b = self.imap()
            b.select("INBOX")
            a.send(b"I1 IDLE\r\n")
            cont = a.readline()
            assert cont.startswith(b"+"), cont
            self.deliver()
            exists = a.readline()
            a.send(b"DONE\r\n")
            done = a.readline()
            assert done.startswith(b"I1 OK"), done
            b.store("1", "+FLAGS", "(\\Deleted)")
            b.expunge()
            a.noop()
            expunged = a.untagged_responses.get("EXPUNGE", [])
            a.logout()
            b.logout()
            return exists, expunged

        exists, expunged = yield deferToThread(client)
        self.assertEqual(exists, b"* 2 EXISTS\r\n")
        self.assertEqual(expunged, [b"1"])

    # --- other clients ---------------------------------------------------------------------------

    def run_tool(self, *command: str) -> subprocess.CompletedProcess[bytes]:
        if not shutil.which(command[0]):
            raise SkipTest(f"{command[0]} is not installed (.ci/run installs it)")
        return subprocess.run(command, capture_output=True, timeout=30)

    @inlineCallbacks
    def test_curl_pop3_and_imap(self):  # type: ignore[no-untyped-def]
        """curl retrieves the message over pop3://, pop3s://, imap:// and imaps:// URLs."""
        yield deferToThread(self.deliver)
        [expected] = self.stored()
        user = f"alice@example.test:{PASSWORD}"
        tls = ["--cacert", str(self.cafile)]
        results = {}
        for scheme, extra, path in (
            ("pop3", [], "/1"),
            ("pop3s", tls, "/1"),
            ("imap", [], "/INBOX;UID=1"),
            ("imaps", tls, "/INBOX;UID=1"),
        ):
            port = self.server.port(scheme)
            url = f"{scheme}://127.0.0.1:{port}{path}"
            result = yield deferToThread(self.run_tool, "curl", "-sS", "--user", user, *extra, url)
            self.assertEqual(result.returncode, 0, (scheme, result.stderr))
            results[scheme] = result.stdout
        # curl's POP3 gives the message as sent on the wire; its IMAP gives the literal.
        for scheme, got in results.items():
            self.assertEqual(got, expected, scheme)

    @inlineCallbacks
    def test_fetchmail_pop3_and_imap(self):  # type: ignore[no-untyped-def]
        """fetchmail downloads over POP3 (STLS) and IMAP (STARTTLS), verifying our certificate."""
        if not shutil.which("fetchmail"):
            raise SkipTest("fetchmail is not installed (.ci/run installs it)")
        yield deferToThread(self.deliver)
        yield deferToThread(self.deliver, BODY, "bob@example.test")
        out = self.dir / "fetched"
        out.mkdir()
        rc = self.dir / "fetchmailrc"
        rc.write_text(
            "set no syslog\n"
            f"poll 127.0.0.1 proto POP3 port {self.server.port('pop3')}\n"
            f'  user "alice@example.test" password "{PASSWORD}" is root here\n'
            f'  sslproto TLS1.2+ sslcertck sslcommonname localhost sslcertfile "{self.cafile}"\n'
            f"  keep mda \"/bin/sh -c 'cat > {out}/pop3.eml'\"\n"
            f"poll 127.0.0.1 proto IMAP port {self.server.port('imap')}\n"
            f'  user "bob@example.test" password "{PASSWORD}" is root here\n'
            f'  sslproto TLS1.2+ sslcertck sslcommonname localhost sslcertfile "{self.cafile}"\n'
            f"  keep mda \"/bin/sh -c 'cat > {out}/imap.eml'\"\n"
        )
        os.chmod(rc, 0o600)
        result = yield deferToThread(
            self.run_tool,
            "fetchmail",
            "-f",
            str(rc),
            "--idfile",
            str(self.dir / "ids"),
            "--nodetach",
            "--nosyslog",
            "-v",
        )
        self.assertIn(result.returncode, (0, 1), result.stdout + result.stderr)  # 1: nothing new is fine
        [alice] = self.stored("alice@example.test")
        [bob] = self.stored("bob@example.test")
        # fetchmail hands the MDA LF line endings and may add a Received header of its own on top.
        self.assertTrue((out / "pop3.eml").read_bytes().endswith(alice.replace(b"\r\n", b"\n")))
        self.assertTrue((out / "imap.eml").read_bytes().endswith(bob.replace(b"\r\n", b"\n")))
