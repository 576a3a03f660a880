"""Issue 7 (the Miscellaneous tab) end to end, with clients we did not write.

Mail goes in over SMTP (smtplib, swaks) from 127.0.0.1 or 127.0.0.2 (Linux routes all of 127/8 to
loopback, so binding the client socket gives the server two different clients) and comes back out
through IMAP (imaplib) and POP3 (poplib), which must agree byte for byte; the stdlib ``email``
package parses what they return.  Reverse names come from a real twisted.names server on 127.0.0.1
(tests/support/dnsserver.py).
"""

from __future__ import annotations

import binascii
import imaplib
import poplib
import re
import shutil
import smtplib
import subprocess
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

import tnefparse
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.names import dns
from twisted.trial.unittest import SkipTest, TestCase

from kms import __version__
from kms.clientinfo import ClientInfo
from kms.rdns import ClientNamer
from tests.support.clients import IMAPFrom, POP3From
from tests.support.dnsserver import DNSTestServer
from tests.support.server import RunningServer, add_user, write_config
from tests.test_convert_e2e import tnef_message
from tests.test_convert_tnef import BAD, BODY_TYPES, GOOD, repair_checksums, sample

PASSWORD = "correct horse battery"
USERS = ("alice@example.test", "bob@example.test", "carol@example.test", "box@example.org")
INSIDE, OUTSIDE, LIAR = "127.0.0.1", "127.0.0.2", "127.0.0.3"






def uuencode(data: bytes, name: str, nl: bytes) -> bytes:
    lines = [f"begin 644 {name}".encode()]
    lines += [binascii.b2a_uu(data[i : i + 45], backtick=True).rstrip(b"\n") for i in range(0, len(data), 45)]
    lines += [b"`", b"end"]
    return nl.join(lines) + nl


def parse(data: bytes) -> EmailMessage:
    return message_from_bytes(data, policy=default)  # type: ignore[return-value]


def by_subject(stored: list[bytes]) -> dict[str, EmailMessage]:
    return {str(m["Subject"]): m for m in map(parse, stored)}


def attachments(msg: EmailMessage) -> list[tuple[str | None, Any]]:
    return [(p.get_filename(), p.get_payload(decode=True)) for p in msg.walk() if p.get_filename()]


def body_text(msg: EmailMessage) -> str:
    [text] = [p for p in msg.walk() if p.get_content_type() == "text/plain" and not p.get_filename()]
    return str(text.get_content()).replace("\r\n", "\n")


def first_received(msg: EmailMessage) -> str:
    """The newest Received header, unfolded."""
    return "Received: " + " ".join(str(msg.get_all("Received", [""])[0]).split())


class _MiscServer(TestCase):
    """The real service tree with SMTP, POP3 and IMAP; four users; example.org's catch-all is box."""

    timeout = 120
    local = '["10.9.9.9"]'
    hide_version = True
    hide_local_ip = False
    misc = ""  # extra [misc] keys
    extra = ""  # extra sections

    def dns_server(self) -> DNSTestServer | None:
        """The DNS server `[dns] servers` names (started here), or None for /etc/resolv.conf."""
        return None

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.dns = self.dns_server()
        extra = self.extra + '\n[domains.catch_all]\n"example.org" = "box"\n'
        if self.dns is not None:
            self.dns.start(reactor)
            self.addCleanup(self.dns.stop)
            extra += f'\n[dns]\nservers = ["{self.dns.address}"]\ntimeout = "60s"\n'
        self.dir = Path(self.mktemp()).absolute()
        path = write_config(
            self.dir,
            listeners={name: "tcp:0:interface=127.0.0.1" for name in ("smtp", "pop3", "imap")},
            local=self.local,
            hide_version=self.hide_version,
            hide_local_ip=self.hide_local_ip,
            max_size="20MB",
            extra=extra,
        )
        path.write_text(path.read_text().replace("[misc]\n", "[misc]\n" + self.misc))
        self.server = RunningServer(path)
        for user in USERS:
            add_user(self.server.config, user, PASSWORD, "des")
        yield self.server.start()
        self.addCleanup(self.server.stop)

    # --- blocking clients: call them in a thread ------------------------------------------------

    def smtp(self, source: str = INSIDE) -> smtplib.SMTP:
        return smtplib.SMTP(
            "127.0.0.1",
            self.server.port("smtp"),
            local_hostname="client.remote.test",
            timeout=30,
            source_address=(source, 0),
        )

    def send(self, recipients: list[str], *messages: bytes, source: str = INSIDE) -> None:
        with self.smtp(source) as s:
            for m in messages:
                s.sendmail("sender@remote.test", recipients, m)

    def imap(self, user: str, source: str = INSIDE) -> imaplib.IMAP4:
        m = IMAPFrom(source, self.server.port("imap"))
        m.login(user, PASSWORD)
        return m

    def pop3(self, user: str, source: str = INSIDE) -> poplib.POP3:
        p = POP3From(source, self.server.port("pop3"))
        p.user(user)
        p.pass_(PASSWORD)
        return p

    def read_back(self, user: str) -> list[bytes]:
        """Every message of ``user``, fetched with IMAP and retrieved with POP3 (which must agree)."""
        m = self.imap(user)
        _, counts = m.select("INBOX", readonly=True)
        by_imap: list[bytes] = []
        if int(counts[0] or 0) > 0:
            _, data = m.fetch("1:*", "(BODY.PEEK[])")
            by_imap = [item[1] for item in data if isinstance(item, tuple)]
        m.logout()
        p = self.pop3(user)
        count, _ = p.stat()
        by_pop3 = [b"\r\n".join(p.retr(n)[1]) + b"\r\n" for n in range(1, count + 1)]
        p.quit()
        self.assertEqual(by_imap, by_pop3)
        return by_imap

    def log(self, name: str) -> str:
        path = self.server.store / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else ""


# --- TNEF and uuencode, read back through IMAP and POP3 ------------------------------------------


class ConversionReadBackTests(_MiscServer):
    extra = '\n[logs]\ndebug = ["message_decoding"]\n'

    @inlineCallbacks
    def test_every_tnef_sample(self):  # type: ignore[no-untyped-def]
        """Good samples: their bodies and every attachment, bytes identical to what tnefparse
        extracts.  Malformed ones: winmail.dat kept byte for byte, and debug.log says why."""
        sent = {name: sample(name) for name in [*GOOD, *BAD]}
        repaired = "duplicate_filename.tnef, checksums repaired"
        sent[repaired] = repair_checksums(sample("duplicate_filename.tnef"))
        expected = {**GOOD, repaired: ["file_abcdefgh.txt", "file_abcdefgh (2).txt", "VIA_Nytt_14021.htm"]}

        def client() -> list[bytes]:
            messages = [
                tnef_message(raw).replace(b"Subject: winmail", b"Subject: " + name.encode(), 1)
                for name, raw in sent.items()
            ]
            self.send(["alice@example.test"], *messages)
            return self.read_back("alice@example.test")

        got = by_subject((yield deferToThread(client)))
        self.assertEqual(sorted(got), sorted(sent))
        for name, names in expected.items():
            msg = got[name]
            self.assertNotIn("application/ms-tnef", [p.get_content_type() for p in msg.walk()], name)
            found = attachments(msg)
            self.assertEqual([f for f, _ in found], names, name)
            carried = [bytes(a.data) for a in tnefparse.TNEF(sent[name]).attachments]
            self.assertEqual([d for _, d in found], carried, name)
            if name in BODY_TYPES:
                leaves = [p for p in msg.walk() if not p.is_multipart() and not p.get_filename()]
                self.assertEqual([p.get_content_type() for p in leaves[1:]], BODY_TYPES[name], name)
        for name in BAD:
            [kept] = [p for p in got[name].walk() if p.get_content_type() == "application/ms-tnef"]
            self.assertEqual(kept.get_payload(decode=True), sent[name], name)
        debug = self.log("debug")
        self.assertEqual(debug.count(" message_decoding.kept "), len(BAD))
        self.assertEqual(debug.count(" message_decoding.converted "), len(expected))
        for reason in set(BAD.values()):
            self.assertIn(reason, debug)

    @inlineCallbacks
    def test_uuencode_single_and_multiple_crlf_and_lf(self):  # type: ignore[no-untyped-def]
        """One and three uuencoded files sent with CRLF (smtplib) and with bare LF line ends (swaks
        --no-data-fixup): the same attachments either way, the text around them kept as the body."""
        if shutil.which("swaks") is None:
            raise SkipTest("swaks is not installed (.ci/run installs it)")
        single = bytes(range(256)) * 3
        one, two, three = b"first file\n", bytes(range(255, -1, -1)) * 5, b"third file, same name\n"

        def message(nl: bytes, subject: str, multiple: bool) -> bytes:
            head = b"From: <sender@remote.test>" + nl + b"Subject: " + subject.encode() + nl + nl
            if not multiple:
                return head + b"Hello," + nl + uuencode(single, "single.bin", nl) + b"Bye." + nl
            return b"".join(
                [
                    head + b"Three files:" + nl,
                    uuencode(one, "notes.txt", nl),
                    b"between" + nl,
                    uuencode(two, "picture.png", nl),
                    uuencode(three, "notes.txt", nl),
                    b"the end" + nl,
                ]
            )

        def swaks(data: bytes) -> str:
            path = self.dir / "message.eml"
            # --no-data-fixup sends the file as it is: the last line ends with the CRLF of CRLF.CRLF
            path.write_bytes(data.removesuffix(b"\n") + b"\r\n.\r\n")
            result = subprocess.run(
                ["swaks", "--server", f"127.0.0.1:{self.server.port('smtp')}", "--helo", "client.remote.test"]
                + ["--from", "sender@remote.test", "--to", "alice@example.test"]
                + ["--data", str(path), "--no-data-fixup"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            return result.stdout

        def client() -> tuple[list[str], list[bytes]]:
            crlf = [message(b"\r\n", "crlf 1", False), message(b"\r\n", "crlf 3", True)]
            self.send(["alice@example.test"], *crlf)
            outputs = [swaks(message(b"\n", "lf 1", False)), swaks(message(b"\n", "lf 3", True))]
            return outputs, self.read_back("alice@example.test")

        outputs, stored = yield deferToThread(client)
        for output in outputs:
            self.assertIn("250 2.0.0 Ok: queued", output)
        got = by_subject(stored)
        self.assertEqual(sorted(got), ["crlf 1", "crlf 3", "lf 1", "lf 3"])
        for variant in ("crlf", "lf"):
            msg = got[f"{variant} 1"]
            self.assertEqual(attachments(msg), [("single.bin", single)], variant)
            self.assertEqual(body_text(msg), "Hello,\nBye.\n", variant)
            msg = got[f"{variant} 3"]
            files = [("notes.txt", one), ("picture.png", two), ("notes (2).txt", three)]
            self.assertEqual(attachments(msg), files, variant)
            types = [p.get_content_type() for p in msg.walk() if p.get_filename()]
            self.assertEqual(types, ["text/plain", "image/png", "text/plain"], variant)
            self.assertEqual(body_text(msg), "Three files:\nbetween\nthe end\n", variant)


# --- X-Envelope-To --------------------------------------------------------------------------------


class EnvelopeToTests(_MiscServer):
    @inlineCallbacks
    def test_three_local_recipients(self):  # type: ignore[no-untyped-def]
        """One transaction, three mailboxes: each copy names only the recipient it was delivered for."""
        recipients = ["alice@example.test", "bob@example.test", "carol@example.test"]

        def client() -> dict[str, list[bytes]]:
            self.send(recipients, b"From: <sender@remote.test>\r\nSubject: three\r\n\r\nhello all\r\n")
            return {r: self.read_back(r) for r in recipients}

        stored = yield deferToThread(client)
        for recipient in recipients:
            [data] = stored[recipient]
            self.assertEqual(parse(data).get_all("X-Envelope-To"), [f"<{recipient}>"])
            for other in set(recipients) - {recipient}:
                self.assertNotIn(other.encode(), data)  # a copy never reveals the other recipients
            self.assertTrue(data.endswith(b"\r\n\r\nhello all\r\n"))

    @inlineCallbacks
    def test_catch_all(self):  # type: ignore[no-untyped-def]
        """Unknown recipients of example.org land in box@example.org, each copy saying for whom."""

        def client() -> tuple[list[bytes], list[bytes]]:
            self.send(["sales@example.org"], b"Subject: one\r\n\r\nfor sales\r\n")
            self.send(["alice@example.test", "Info@Example.ORG"], b"Subject: two\r\n\r\nfor info\r\n")
            return self.read_back("box@example.org"), self.read_back("alice@example.test")

        box, alice = yield deferToThread(client)
        got = by_subject(box)
        self.assertEqual(sorted(got), ["one", "two"])
        self.assertEqual(got["one"].get_all("X-Envelope-To"), ["<sales@example.org>"])
        self.assertIn("for <sales@example.org>;", first_received(got["one"]))
        self.assertEqual(got["two"].get_all("X-Envelope-To"), ["<Info@Example.ORG>"])
        [copy] = map(parse, alice)
        self.assertEqual(copy.get_all("X-Envelope-To"), ["<alice@example.test>"])

    @inlineCallbacks
    def test_catch_all_copy_per_recipient(self):  # type: ignore[no-untyped-def]
        """Two unknown recipients in one transaction: the domain mailbox gets a copy for each, so a
        POP3 downloader can sort them by X-Envelope-To; the same address twice still gives one."""

        def client() -> list[bytes]:
            self.send(
                ["sales@example.org", "info@example.org", "SALES@example.org"],
                b"Subject: both\r\n\r\nfor two\r\n",
            )
            return self.read_back("box@example.org")

        box = yield deferToThread(client)
        stamps = sorted(tuple(parse(m).get_all("X-Envelope-To")) for m in box)
        self.assertEqual(stamps, [("<info@example.org>",), ("<sales@example.org>",)])


# --- Received from two loopback addresses ---------------------------------------------------------


class HiddenLocalIPTests(_MiscServer):
    """127.0.0.1 is in relay.local_group, 127.0.0.2 is not; hide_local_ip is on."""

    local = f'["{INSIDE}"]'
    hide_local_ip = True
    inside = "Received: from client.remote.test by mx.example.test with ESMTP id "
    outside = "Received: from client.remote.test (unknown [127.0.0.2]) by mx.example.test with ESMTP id "

    @inlineCallbacks
    def test_received_from_two_addresses(self):  # type: ignore[no-untyped-def]
        def client() -> list[bytes]:
            self.send(["alice@example.test"], b"Subject: inside\r\n\r\nx\r\n", source=INSIDE)
            self.send(["alice@example.test"], b"Subject: outside\r\n\r\nx\r\n", source=OUTSIDE)
            return self.read_back("alice@example.test")

        stored = yield deferToThread(client)
        got = by_subject(stored)
        for subject, expected in (("inside", self.inside), ("outside", self.outside)):
            received = first_received(got[subject])
            self.assertTrue(received.startswith(expected), received)
        [inside] = [data for data in stored if b"Subject: inside" in data]
        self.assertEqual(INSIDE.encode() in inside, not self.hide_local_ip)


class ShownLocalIPTests(HiddenLocalIPTests):
    hide_local_ip = False
    inside = "Received: from client.remote.test (unknown [127.0.0.1]) by mx.example.test with ESMTP id "


# --- product name and version ---------------------------------------------------------------------


class HiddenVersionTests(_MiscServer):
    hide_version = True

    @inlineCallbacks
    def test_banners(self):  # type: ignore[no-untyped-def]
        """SMTP banner and EHLO, IMAP greeting and ID, POP3 greeting and CAPA IMPLEMENTATION, Received."""

        def client() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            with smtplib.SMTP(local_hostname="client.remote.test", timeout=30) as s:
                seen["smtp"] = s.connect("127.0.0.1", self.server.port("smtp"))[1]
                seen["ehlo"] = s.ehlo()[1].split(b"\n")[0]
                s.sendmail("sender@remote.test", ["alice@example.test"], b"Subject: v\r\n\r\nv\r\n")
            m = IMAPFrom(INSIDE, self.server.port("imap"))
            seen["imap"] = m.welcome
            seen["id"] = m.xatom("ID", '("name" "imaplib")')[0], m.response("ID")[1]
            m.logout()
            p = POP3From(INSIDE, self.server.port("pop3"))
            seen["pop3"] = p.getwelcome()
            seen["capa"] = p.capa()
            p.quit()
            [seen["stored"]] = self.read_back("alice@example.test")
            return seen

        seen = yield deferToThread(client)
        product = "" if self.hide_version else f"kms {__version__}"
        self.assertEqual(seen["smtp"], f"mx.example.test ESMTP {product}".strip().encode())
        self.assertEqual(seen["ehlo"], f"mx.example.test {product}".strip().encode())
        greeting = rf"\* OK \[CAPABILITY [^]]*\] mx\.example\.test {re.escape(product)} ?IMAP4rev1 ready"
        self.assertRegex(seen["imap"].decode(), f"^{greeting}$")
        ours = "NIL" if self.hide_version else f'("name" "kms" "version" "{__version__}")'
        self.assertEqual(seen["id"], ("OK", [ours.encode()]))
        self.assertRegex(seen["pop3"].decode(), rf"^\+OK {re.escape(product)} ?POP3 server ready <[^>]+>$")
        self.assertEqual(seen["capa"].get("IMPLEMENTATION"), product.split() or None)
        by = f"by mx.example.test ({product}) with " if product else "by mx.example.test with "
        self.assertIn(by, first_received(parse(seen["stored"])))
        header = seen["stored"].split(b"\r\n\r\n")[0]
        said = b"\n".join([seen["smtp"], seen["ehlo"], seen["imap"], seen["id"][1][0], seen["pop3"], header])
        self.assertEqual(b"kms" in said.lower(), not self.hide_version)
        self.assertEqual(__version__.encode() in said, not self.hide_version)


class ShownVersionTests(HiddenVersionTests):
    hide_version = False


# --- reverse names in the logs --------------------------------------------------------------------


def probe(ip: str) -> ClientInfo:
    """A client that joins (or reads) the look-up the server's own connections started."""
    return ClientInfo(ip, 0, "127.0.0.1", 0, "smtp")


def ptr_name(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


class _NamesServer(_MiscServer):
    """resolve_client_names on, 127.0.0.1 in the local group with hide_local_ip, smtp/imap/pop3 debug."""

    local = f'["{INSIDE}"]'
    hide_local_ip = True
    misc = "resolve_client_names = true\n"
    extra = '\n[logs]\ndebug = ["smtp", "imap", "pop3"]\n'

    @property
    def namer(self) -> ClientNamer:
        return self.server.service.getServiceNamed("client-names").namer  # type: ignore[attr-defined,no-any-return]

    def queries(self, name: str, rtype: int) -> int:
        assert self.dns is not None
        return self.dns.resolver.queries.count((name, rtype))

    def logs(self) -> str:
        return self.log("mail") + self.log("security") + self.log("debug")

    def connect_and_quit(self, *sources: str) -> None:
        for source in sources:
            with self.smtp(source) as s:
                s.ehlo()


class ClientNamesTests(_NamesServer):
    """127.0.0.1 and 127.0.0.2 have confirmed names; 127.0.0.3's PTR names a host that is elsewhere."""

    def dns_server(self) -> DNSTestServer:
        server = DNSTestServer()
        for ip, name, address in [
            (INSIDE, "loopback.example.test", INSIDE),
            (OUTSIDE, "outside.example.test", OUTSIDE),
            (LIAR, "liar.example.test", "192.0.2.1"),
        ]:
            server.add_ptr(ip, name)
            server.add_a(name, address)
        return server

    @inlineCallbacks
    def test_confirmed_names_in_logs_and_received(self):  # type: ignore[no-untyped-def]
        # The first connection from each address starts its look-up; a probe for the same address
        # joins it (still one PTR query each), so once the probes fire the names are known.
        yield deferToThread(self.connect_and_quit, INSIDE, OUTSIDE)
        self.assertEqual((yield self.namer.name(probe(OUTSIDE))), "outside.example.test")
        self.assertEqual((yield self.namer.name(probe(INSIDE))), "loopback.example.test")
        self.assertEqual([self.queries(ptr_name(ip), dns.PTR) for ip in (INSIDE, OUTSIDE)], [1, 1])

        def client() -> list[bytes]:
            self.send(["alice@example.test"], b"Subject: outside\r\n\r\nx\r\n", source=OUTSIDE)
            self.send(["alice@example.test"], b"Subject: inside\r\n\r\nx\r\n", source=INSIDE)
            self.imap("bob@example.test", source=OUTSIDE).logout()
            self.pop3("carol@example.test", source=OUTSIDE).quit()
            return self.read_back("alice@example.test")

        got = by_subject((yield deferToThread(client)))
        outside = "Received: from client.remote.test (outside.example.test [127.0.0.2]) by mx.example.test "
        self.assertTrue(first_received(got["outside"]).startswith(outside), first_received(got["outside"]))
        inside = first_received(got["inside"])
        self.assertTrue(inside.startswith("Received: from client.remote.test by mx.example.test "), inside)
        self.assertNotIn("loopback", inside)  # hide_local_ip hides the name with the address

        # logs name every client, local ones too; a session that starts with the name known has it
        # on every line, from its connect line on
        delivered = [line for line in self.log("mail").splitlines() if " delivered " in line]
        self.assertEqual(len(delivered), 2)
        self.assertIn(" smtp outside.example.test [127.0.0.2] delivered ", delivered[0])
        self.assertIn(" smtp loopback.example.test [127.0.0.1] delivered ", delivered[1])
        session = delivered[0].split(" ")[1]
        lines = [line for line in self.log("debug").splitlines() if line.split(" ")[1] == session]
        self.assertIn(" smtp.connect", lines[0])
        self.assertGreater(len(lines), 3)
        for line in lines:
            self.assertIn(f"{session} smtp outside.example.test [127.0.0.2] ", line)
        logins = [line for line in self.log("security").splitlines() if "[127.0.0.2] login " in line]
        self.assertEqual(len(logins), 2)
        self.assertIn(" imap outside.example.test [127.0.0.2] login ", logins[0])
        self.assertIn(" pop3 outside.example.test [127.0.0.2] login ", logins[1])

    @inlineCallbacks
    def test_unconfirmed_name_never_shown(self):  # type: ignore[no-untyped-def]
        """127.0.0.3's PTR says liar.example.test, whose A record is another address: no name."""
        yield deferToThread(self.connect_and_quit, LIAR)
        self.assertIsNone((yield self.namer.name(probe(LIAR))))
        self.assertEqual(self.queries("liar.example.test", dns.A), 1)  # the name was checked
        yield deferToThread(self.send, ["alice@example.test"], b"Subject: liar\r\n\r\nx\r\n", source=LIAR)
        [stored] = yield deferToThread(self.read_back, "alice@example.test")
        received = first_received(parse(stored))
        expected = "Received: from client.remote.test (unknown [127.0.0.3]) "
        self.assertTrue(received.startswith(expected), received)
        self.assertIn(" smtp [127.0.0.3] delivered ", self.logs())
        self.assertNotIn("liar", self.logs())
        self.assertEqual(self.queries(ptr_name(LIAR), dns.PTR), 1)  # "no name" was remembered


class SilentDNSTests(_NamesServer):
    """A DNS server that never answers, and a 60 s DNS timeout."""

    def dns_server(self) -> DNSTestServer:
        return DNSTestServer(silent=True)

    @inlineCallbacks
    def test_sessions_not_delayed(self):  # type: ignore[no-untyped-def]
        """SMTP, IMAP and POP3 sessions from 127.0.0.2 run from greeting to logout while the look-up
        their connections started is still outstanding: none of them waited for it."""

        def client() -> tuple[bytes, bytes, bytes]:
            with smtplib.SMTP(local_hostname="c.remote.test", timeout=30, source_address=(OUTSIDE, 0)) as s:
                banner = s.connect("127.0.0.1", self.server.port("smtp"))[1]
                s.sendmail("sender@remote.test", ["alice@example.test"], b"Subject: s\r\n\r\nx\r\n")
            m = self.imap("alice@example.test", source=OUTSIDE)
            m.logout()
            p = self.pop3("alice@example.test", source=OUTSIDE)
            p.quit()
            return banner, m.welcome, p.welcome

        banner, imap_greeting, pop3_greeting = yield deferToThread(client)
        self.assertEqual(banner, b"mx.example.test ESMTP")
        self.assertTrue(imap_greeting.startswith(b"* OK "))
        self.assertTrue(pop3_greeting.startswith(b"+OK "))
        # The order of events: the PTR query reached the DNS server (one for three connections),
        # every session ran to its end, and the look-up is still waiting for its answer now.
        self.assertEqual(self.queries(ptr_name(OUTSIDE), dns.PTR), 1)
        self.assertEqual(self.namer.in_flight, 1)
        logs = self.logs()
        for event in ("smtp.connect", "delivered", "login"):
            self.assertRegex(logs, rf"(?m) [a-z0-9]+ [a-z0-9]+ \[127\.0\.0\.2\] {re.escape(event)}( |$)")
        self.assertNotIn("example.test [127.0.0.2]", logs)
