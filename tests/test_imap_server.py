"""The IMAP protocol on a StringTransport: exact responses, states, limits, timers, SASL, STARTTLS,
sequence numbers across sessions, and the long-response machinery (batches, backpressure).

The store is an in-test double of `Account`/`FolderView` that keeps one folder state shared by
every session's view and queues events the way `kms.store.mailbox` does (a session's own flag
changes at once, everything else through ``sync``), so cross-session behaviour is real.  Messages
carry the real analyzer's ``meta``.  Regression tests for Twisted's IMAP bugs I1–I10 (audit §3.4)
are marked as such.
"""

from __future__ import annotations

import base64
import dataclasses
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from kms.auth.errors import AuthenticationFailed, TemporaryAuthFailure
from kms.auth.policy import SecurityPolicy, engine_policy
from kms.auth.sasl import Authenticated, SASLEngine, plaintext_login
from kms.clientinfo import ClientInfo
from kms.imap import server as imap_server
from kms.imap.message import analyze
from kms.imap.parser import MAX_LINE, list_matcher
from kms.imap.server import BACKLOG_LIMIT, IMAPFactory, IMAPServer, IMAPSettings, list_selection
from kms.ipgroups import parse_group
from kms.store.index import FolderDetails
from kms.store.interfaces import FolderEvent, FolderListing, FolderStatus, MailboxError, MessageInfo
from kms.wireform import header_section

HOST = "imap.example.test"
CONTEXT = object()  # stands in for an IOpenSSLServerConnectionCreator
SETTINGS = IMAPSettings(
    hostname=HOST,
    listener="imap",
    implicit_tls=False,
    hide_version=True,
    append_limit=10000,
    command_timeout=1800,
    idle_timeout=600,
    max_errors=5,
    max_line=4096,
    max_literal=1024,
)
BASE_CAPS = (
    "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE IDLE NAMESPACE UNSELECT UIDPLUS MOVE CHILDREN SPECIAL-USE"
    " APPENDLIMIT=10000"
)
GREETING = f"* OK [CAPABILITY {BASE_CAPS} STARTTLS AUTH=PLAIN] {HOST} IMAP4rev1 ready\r\n".encode()
LOGGED_IN = f"a OK [CAPABILITY {BASE_CAPS}] Logged in\r\n".encode()
DATE = 1643709600.0  # 2022-02-01 10:00:00 UTC
STORE_PROGRESS = 2  # changed messages per progress report of the store double


def mail(
    subject: str = "first", sender: str = "Ann Example <ann@example.test>", body: str = "Hello Bob."
) -> bytes:
    return (
        f"From: {sender}\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
        f"Date: Tue, 1 Feb 2022 10:00:00 +0000\r\nMessage-ID: <{subject}@example.test>\r\n\r\n{body}\r\n"
    ).encode()


def flags_lines(keyword: str) -> bytes:
    """FLAGS and PERMANENTFLAGS of a read-write session that knows one keyword."""
    flags = b"\\Seen \\Answered \\Flagged \\Deleted \\Draft " + keyword.encode()
    return b"* FLAGS (%b)\r\n* OK [PERMANENTFLAGS (%b \\*)] Flags permitted\r\n" % (flags, flags)


# --- the store double ----------------------------------------------------------------------------


class Folder:
    def __init__(
        self, account: FakeAccount, name: str, uidvalidity: int, attributes: Sequence[str] = ()
    ) -> None:
        self.account = account
        self.name = name
        self.uidvalidity = uidvalidity
        self.uidnext = 1
        self.attributes = frozenset(attributes)
        self.subscribed = True
        self.messages: list[MessageInfo] = []
        self.bodies: dict[int, bytes] = {}
        self.views: list[FakeView] = []
        self.recent: set[int] = set()
        # As a folder opened from its index: headers and meta unreadable until a view's details().
        self.details = FolderDetails()
        self.headers: dict[int, bytes] = {}
        self.metas: dict[int, Mapping[str, object]] = {}

    def add(self, wire: bytes, flags: Iterable[str] = (), date: float = DATE) -> MessageInfo:
        uid = self.uidnext
        self.uidnext += 1
        info = MessageInfo(uid, len(wire), date, frozenset(flags), self.details)
        self.headers[uid], self.metas[uid] = header_section(wire), analyze(wire)
        self.messages.append(info)
        self.bodies[uid] = wire
        self.recent.add(uid)
        self.publish(FolderEvent(added=[info]))
        return info

    def publish(self, event: FolderEvent, skip: FakeView | None = None) -> None:
        for view in list(self.views):
            if view is not skip:
                view.queue(event)


class FakeView:
    def __init__(self, folder: Folder, readonly: bool) -> None:
        self.folder = folder
        self.account = folder.account
        self.name = folder.name
        self.readonly = readonly
        self.uidvalidity = folder.uidvalidity
        self.uidnext = folder.uidnext
        self.messages: list[MessageInfo] = list(folder.messages)
        self.recent = frozenset(folder.recent)
        if not readonly:
            folder.recent.clear()
        self.pending: list[FolderEvent] = []
        self.listener: Callable[[], None] | None = None
        self.closed = False
        self.refreshes = 0
        folder.views.append(self)

    def queue(self, event: FolderEvent) -> None:
        self.pending.append(event)
        if self.listener is not None:
            self.listener()

    def set_listener(self, listener: Callable[[], None] | None) -> None:
        self.listener = listener

    def sync(self) -> FolderEvent:
        """As the store's: ``added`` are new to the snapshot, ``expunged`` were in it (ascending)."""
        pending, self.pending = self.pending, []
        self.uidnext = self.folder.uidnext
        snapshot = {m.uid for m in self.messages}
        gone = {uid for event in pending for uid in event.expunged}
        changed = {info.uid: info for event in pending for info in event.flags}
        added = [changed.get(m.uid, m) for event in pending for m in event.added if m.uid not in gone]
        self.messages = [changed.get(m.uid, m) for m in self.messages if m.uid not in gone] + added
        taken = {m.uid for m in added} & self.folder.recent
        self.recent = (self.recent - gone) | taken
        if not self.readonly:
            self.folder.recent -= taken
        flags = [info for uid, info in changed.items() if uid in snapshot - gone]
        return FolderEvent(added, sorted(gone & snapshot), flags)

    def refresh(self) -> Deferred[None]:
        self.refreshes += 1
        return succeed(None)

    def store(
        self,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: str,
        progress: Callable[[Sequence[MessageInfo]], None] | None = None,
    ) -> Deferred[Sequence[MessageInfo]]:
        """Changed messages go to ``progress`` in batches of `STORE_PROGRESS` first, as the
        store's renames report them."""
        self.account.calls.append(("store", list(uids), list(flags), mode))
        if self.readonly:
            return fail(MailboxError("mailbox is read-only", "CANNOT"))
        wanted, targets = frozenset(flags), set(uids)
        result, changed = [], {}
        for i, info in enumerate(self.folder.messages):
            if info.uid in targets:
                new = info.flags | wanted if mode == "+" else info.flags - wanted if mode == "-" else wanted
                if new != info.flags:
                    info = self.folder.messages[i] = dataclasses.replace(info, flags=frozenset(new))
                    changed[info.uid] = info
                result.append(info)
        reported = list(changed.values())
        if progress is not None:
            for start in range(0, len(reported), STORE_PROGRESS):
                progress(reported[start : start + STORE_PROGRESS])
        self.messages = [changed.get(m.uid, m) for m in self.messages]
        if changed:
            self.folder.publish(FolderEvent(flags=reported), skip=self)
        return succeed(result)

    def expunge(self, uids: Sequence[int] | None = None) -> Deferred[Sequence[int]]:
        self.account.calls.append(("expunge", None if uids is None else list(uids)))
        folder = self.folder
        gone = [m.uid for m in folder.messages if "\\Deleted" in m.flags and (uids is None or m.uid in uids)]
        folder.messages = [m for m in folder.messages if m.uid not in gone]
        if gone:
            folder.publish(FolderEvent(expunged=gone))  # to this view too: it learns in sync()
        return succeed(gone)

    def copy(self, uids: Sequence[int], target: str) -> Deferred[tuple[int, Sequence[tuple[int, int]]]]:
        self.account.calls.append(("copy", list(uids), target))
        destination = self.account.folders.get(target)
        if destination is None:
            return fail(MailboxError("no such mailbox", "TRYCREATE"))
        if self.account.copy_fails:
            return fail(MailboxError("not enough disk space", "OVERQUOTA"))
        pairs = []
        for info in list(self.folder.messages):
            if info.uid in uids:
                pairs.append((info.uid, destination.add(self.folder.bodies[info.uid], info.flags).uid))
        return succeed((destination.uidvalidity, pairs))

    def open_message(self, uid: int) -> Deferred[bytes]:
        self.account.opened.append(uid)
        if uid not in {m.uid for m in self.folder.messages}:
            return fail(MailboxError(f"message {uid} has been expunged", "EXPUNGEISSUED"))
        body = self.folder.bodies[uid]
        if self.account.hold_reads:
            d: Deferred[bytes] = Deferred()
            self.account.held_reads.append((d, body))
            return d
        return succeed(body)

    def details(self, messages: Iterable[MessageInfo]) -> Deferred[None]:
        missing = self.folder.details.missing(info.uid for info in messages)
        if missing:
            self.account.detail_loads += 1
            headers = {uid: self.folder.headers[uid] for uid in missing}
            self.folder.details.add((headers, {uid: self.folder.metas[uid] for uid in missing}), whole=False)
        return succeed(None)

    def open_messages(self, messages: Sequence[MessageInfo]) -> Deferred[dict[int, bytes]]:
        uids = [info.uid for info in messages]
        self.account.opened.extend(uids)
        if self.account.read_error is not None:
            return fail(self.account.read_error)
        present = {m.uid for m in self.folder.messages}
        bodies = {uid: self.folder.bodies[uid] for uid in uids if uid in present}
        if self.account.hold_reads:
            d: Deferred[dict[int, bytes]] = Deferred()
            self.account.held_reads.append((d, bodies))
            return d
        return succeed(bodies)

    def close(self) -> None:
        self.closed = True
        self.folder.views.remove(self)


class FakeAccount:
    def __init__(self, address: str) -> None:
        self.address = address
        self.calls: list[tuple[Any, ...]] = []
        self.opened: list[int] = []
        self.detail_loads = 0  # FolderDetails filled by a view (first header/meta need)
        self.views: list[FakeView] = []
        self.copy_fails = False
        self.hold_reads = False
        self.read_error: Exception | None = None
        self.held_reads: list[tuple[Deferred[Any], Any]] = []
        self.folders: dict[str, Folder] = {}
        for index, (name, attributes) in enumerate(
            [("INBOX", ()), ("Sent", ("\\Sent",)), ("Trash", ("\\Trash",)), ("été", ()), ("a/b", ())]
        ):
            self.folders[name] = Folder(self, name, 7 + index, attributes)

    def release_reads(self) -> None:
        while self.held_reads:
            d, body = self.held_reads.pop(0)
            d.callback(body)

    def _folder(self, name: str) -> Folder:
        folder = self.folders.get(name)
        if folder is None:
            raise MailboxError("no such mailbox", "NONEXISTENT")
        return folder

    def list(self) -> Deferred[Sequence[FolderListing]]:
        listing = []
        for name, folder in self.folders.items():
            children = any(other.startswith(name + "/") for other in self.folders)
            attributes = folder.attributes | {"\\HasChildren" if children else "\\HasNoChildren"}
            listing.append(FolderListing(name, attributes, folder.subscribed))
        return succeed(listing)

    def open(self, name: str, readonly: bool = False) -> Deferred[Any]:
        try:
            view = FakeView(self._folder(name), readonly)
        except MailboxError as e:
            return fail(e)
        self.views.append(view)
        return succeed(view)

    def status(self, name: str) -> Deferred[FolderStatus]:
        folder = self._folder(name)
        unseen = sum("\\Seen" not in m.flags for m in folder.messages)
        return succeed(
            FolderStatus(len(folder.messages), len(folder.recent), folder.uidnext, folder.uidvalidity, unseen)
        )

    def create(self, name: str) -> Deferred[None]:
        self.calls.append(("create", name))
        if name in self.folders:
            return fail(MailboxError("mailbox exists", "ALREADYEXISTS"))
        self.folders[name] = Folder(self, name, 99)
        return succeed(None)

    def delete(self, name: str) -> Deferred[None]:
        self.calls.append(("delete", name))
        self._folder(name)
        del self.folders[name]
        return succeed(None)

    def rename(self, old: str, new: str) -> Deferred[None]:
        self.calls.append(("rename", old, new))
        folder = self._folder(old)
        del self.folders[old]
        folder.name = new
        self.folders[new] = folder
        return succeed(None)

    def subscribe(self, name: str, subscribed: bool) -> Deferred[None]:
        self._folder(name).subscribed = subscribed
        return succeed(None)

    def append(
        self, name: str, data: bytes, flags: Sequence[str] = (), internal_date: float | None = None
    ) -> Deferred[tuple[int, int]]:
        self.calls.append(("append", name, data, list(flags), internal_date))
        folder = self.folders.get(name)
        if folder is None:
            return fail(MailboxError("no such mailbox", "TRYCREATE"))
        info = folder.add(data, flags, internal_date or DATE)
        return succeed((folder.uidvalidity, info.uid))


# --- login session, logs, transport --------------------------------------------------------------


def _policy(name: str, client: ClientInfo) -> bool:
    """LOGIN only over TLS, so the mechanism list changes with STARTTLS."""
    return name != "LOGIN" or client.tls


class FakeSession:
    """Around the real PLAIN/LOGIN mechanisms; alice/secret is the only login."""

    def __init__(self, client: ClientInfo, test: IMAPTestCase) -> None:
        self.client = client
        self.test = test
        self.logouts = 0
        self.engine = SASLEngine(["PLAIN", "LOGIN"], _policy)

    def mechanisms(self) -> list[str]:
        return self.engine.available(self.client)

    def begin(self, name: str) -> Any:
        return self.engine.create(name, self)

    def login_plaintext(self, username: str, password: str, method: str) -> Deferred[Authenticated]:
        return plaintext_login(self, method, username, password)

    def login(self, credentials: Any) -> Deferred[Authenticated]:
        password = credentials.password
        self.test.logins.append((credentials.username, credentials.mechanism))
        if password == "tempfail":
            result: Deferred[Authenticated] = fail(TemporaryAuthFailure("directory down"))
        elif (credentials.username, password) == ("alice", "secret"):
            self.client.identity = "alice@example.test"
            result = succeed(Authenticated("alice@example.test"))
        else:
            result = fail(AuthenticationFailed("wrong password"))
        if self.test.hold_logins:
            held: Deferred[Authenticated] = Deferred()
            self.test.held_logins.append((held, result))
            return held
        return result

    def refuse(self, username: str, method: str, reason: str) -> Deferred[Authenticated]:
        return fail(AuthenticationFailed(reason))

    def logout(self) -> None:
        self.logouts += 1


class RecordingLogs:
    def __init__(self) -> None:
        self.debugs: list[tuple[str, str, dict[str, object]]] = []
        self.errors: list[tuple[str, dict[str, object]]] = []
        self.securities: list[tuple[str, dict[str, object]]] = []

    def debug(self, category: str, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        self.debugs.append((category, event, fields))

    def error(self, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        self.errors.append((event, fields))

    def security(self, event: str, client: ClientInfo | None = None, **fields: object) -> None:
        self.securities.append((event, fields))


class FakeSocket:
    def __init__(self) -> None:
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


class Transport(StringTransport):
    """A TCP-like StringTransport: NODELAY, the socket (QUICKACK), STARTTLS, abort."""

    def __init__(self) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 143),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
        )
        self.nodelay: bool | None = None
        self.socket = FakeSocket()
        self.tls_context: object = None
        self.before_tls = b""
        self.aborted = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def getHandle(self) -> FakeSocket:
        return self.socket

    def startTLS(self, context: object) -> None:
        self.tls_context = context
        self.before_tls = self.value()

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class Conn:
    """One client connection; `send` returns what the server wrote once the clock has run."""

    def __init__(self, test: IMAPTestCase, protocol: IMAPServer, transport: Transport) -> None:
        self.test = test
        self.protocol = protocol
        self.transport = transport

    def send(self, data: bytes) -> bytes:
        self.transport.clear()
        self.protocol.dataReceived(data)
        self.test.clock.advance(0)
        return self.take()

    def lines(self, data: bytes) -> list[bytes]:
        return self.send(data).split(b"\r\n")[:-1]

    def take(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class IMAPTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = RecordingLogs()
        self.account = FakeAccount("alice@example.test")
        self.inbox = self.account.folders["INBOX"]
        self.sessions: list[FakeSession] = []
        self.logins: list[tuple[str, str]] = []
        self.hold_logins = False
        self.held_logins: list[tuple[Deferred[Authenticated], Deferred[Authenticated]]] = []
        self.account_requests: list[str] = []
        self.account_fails = False
        self.factory = self.make_factory()

    def make_factory(self, tls_context: object = CONTEXT, **changes: Any) -> IMAPFactory:
        return IMAPFactory(
            dataclasses.replace(SETTINGS, **changes),
            self.accounts,
            self.session_factory,
            tls_context,
            self.clock,
            self.logs,
        )

    def accounts(self, identity: str) -> Deferred[Any]:
        self.account_requests.append(identity)
        if self.account_fails:
            return fail(OSError(5, "Input/output error"))
        return succeed(self.account)

    def session_factory(self, client: ClientInfo) -> FakeSession:
        session = FakeSession(client, self)
        self.sessions.append(session)
        return session

    def connect(self, factory: IMAPFactory | None = None, **changes: Any) -> Conn:
        if changes:
            factory = self.make_factory(**changes)
        protocol = (factory or self.factory).buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        conn = Conn(self, protocol, transport)
        conn.take()
        return conn

    def login(self, factory: IMAPFactory | None = None, **changes: Any) -> Conn:
        conn = self.connect(factory, **changes)
        self.assertEqual(conn.send(b"a LOGIN alice secret\r\n"), LOGGED_IN)
        return conn

    def selected(self, name: str = "INBOX", factory: IMAPFactory | None = None) -> Conn:
        conn = self.login(factory)
        reply = conn.send(b"s SELECT " + name.encode() + b"\r\n")
        self.assertTrue(reply.endswith(b"s OK [READ-WRITE] SELECT completed\r\n"), reply)
        return conn

    def fill(self, count: int, folder: Folder | None = None, **flags: Any) -> None:
        for n in range(count):
            (folder or self.inbox).add(mail(f"m{n + 1}"), **flags)

    def release_logins(self) -> None:
        while self.held_logins:
            held, result = self.held_logins.pop(0)
            result.chainDeferred(held)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --- greeting, any-state commands ----------------------------------------------------------------


class GreetingTests(IMAPTestCase):
    def test_greeting(self) -> None:
        """Capabilities in the greeting; no product when versions are hidden; NODELAY set."""
        protocol = self.factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), GREETING)
        self.assertTrue(transport.nodelay)
        self.assertEqual(protocol.client.listener, "imap")
        self.assertEqual(self.logs.debugs[0][:2], ("imap", "connect"))

    def test_greeting_with_version(self) -> None:
        from kms import __version__

        conn = self.make_factory(hide_version=False).buildProtocol(None)
        transport = Transport()
        conn.makeConnection(transport)
        self.assertIn(f"] {HOST} kms {__version__} IMAP4rev1 ready\r\n".encode(), transport.value())

    def test_implicit_tls(self) -> None:
        """imaps: TLS from the start, so no STARTTLS, and LOGIN (TLS-only here) is offered."""
        conn = self.connect(listener="imaps", implicit_tls=True)
        self.assertTrue(conn.protocol.client.tls)
        self.assertEqual(
            conn.send(b"c CAPABILITY\r\n"),
            f"* CAPABILITY {BASE_CAPS} AUTH=PLAIN AUTH=LOGIN\r\nc OK CAPABILITY completed\r\n".encode(),
        )

    def test_capability_after_login(self) -> None:
        conn = self.login()
        self.assertEqual(
            conn.send(b"c capability\r\n"),
            f"* CAPABILITY {BASE_CAPS}\r\nc OK CAPABILITY completed\r\n".encode(),
        )

    def test_logindisabled_without_cleartext_mechanisms(self) -> None:
        """LOGIN follows the cleartext mechanisms' policy: none offered, LOGIN refused."""
        conn = self.connect(tls_context=None)
        self.sessions[0].engine = SASLEngine(["PLAIN"], lambda name, client: client.tls)
        self.assertEqual(
            conn.send(b"c CAPABILITY\r\n"),
            f"* CAPABILITY {BASE_CAPS} LOGINDISABLED\r\nc OK CAPABILITY completed\r\n".encode(),
        )
        self.assertEqual(
            conn.send(b"l LOGIN alice secret\r\n"),
            b"l NO [PRIVACYREQUIRED] Cleartext login is not allowed here\r\n",
        )
        self.assertEqual(self.logins, [])

    def test_noop_logout(self) -> None:
        """LOGOUT: BYE, OK, closed; what was pipelined after it is ignored."""
        conn = self.connect()
        self.assertEqual(conn.send(b"n NOOP\r\n"), b"n OK NOOP completed\r\n")
        self.assertEqual(
            conn.send(b"x LOGOUT\r\ny NOOP\r\n"), b"* BYE Logging out\r\nx OK LOGOUT completed\r\n"
        )
        self.assertTrue(conn.closed)
        self.assertEqual(conn.send(b"z NOOP\r\n"), b"")

    def test_errors(self) -> None:
        """Unknown commands, bad syntax, wrong state: BAD with the tag (or untagged)."""
        conn = self.connect(max_errors=50)
        for line, reply in [
            (b"a XYZZY\r\n", b"a BAD Unknown command XYZZY\r\n"),
            (b"a SELECT INBOX\r\n", b"a BAD SELECT: not authenticated\r\n"),
            (b"a FETCH 1 FLAGS\r\n", b"a BAD FETCH: not authenticated\r\n"),
            (b"+x NOOP\r\n", b"* BAD Invalid tag\r\n"),
            (b"\r\n", b"* BAD Invalid tag\r\n"),
            (b"a\r\n", b"a BAD Missing command\r\n"),
            (b'a LOGIN "x\r\n', b"a BAD Invalid quoted string\r\n"),
            (b"a NOOP extra\r\n", b"a BAD NOOP: Unexpected extra arguments\r\n"),
            (b"a LOGIN \x00 x\r\n", b"a BAD Control character in command\r\n"),
        ]:
            self.assertEqual(conn.send(line), reply, line)
        conn = self.login()
        self.assertEqual(conn.send(b"b LOGIN a b\r\n"), b"b BAD LOGIN: not valid in this state\r\n")
        self.assertEqual(conn.send(b"b CLOSE\r\n"), b"b BAD CLOSE: not valid in this state\r\n")

    def test_too_many_errors(self) -> None:
        conn = self.connect()
        for _ in range(5):
            conn.send(b"a BOGUS\r\n")
        self.assertEqual(
            conn.send(b"a BOGUS\r\n"), b"a BAD Unknown command BOGUS\r\n* BYE Too many errors\r\n"
        )
        self.assertTrue(conn.closed)

    def test_id(self) -> None:
        """RFC 2971: our ID is NIL when versions are hidden (no product name); the client's is logged."""
        conn = self.connect()
        self.assertEqual(
            conn.send(b'i ID ("name" "Mutt" "version" NIL)\r\n'),
            b"* ID NIL\r\ni OK ID completed\r\n",
        )
        self.assertIn(("imap", "id", {"client_id": "{'name': 'Mutt', 'version': None}"}), self.logs.debugs)
        self.assertEqual(conn.send(b"i ID NIL\r\n"), b"* ID NIL\r\ni OK ID completed\r\n")
        self.assertEqual(conn.send(b'i ID ("name")\r\n'), b"i BAD ID: Invalid ID parameters\r\n")
        from kms import __version__

        conn = self.connect(hide_version=False)
        self.assertEqual(
            conn.send(b"i ID NIL\r\n"),
            f'* ID ("name" "kms" "version" "{__version__}")\r\ni OK ID completed\r\n'.encode(),
        )

    def test_autologout(self) -> None:
        """RFC 3501 §5.4: an idle client is logged out after the command timeout (30 min here)."""
        conn = self.connect()
        self.clock.advance(1799)
        self.assertEqual(conn.send(b"n NOOP\r\n"), b"n OK NOOP completed\r\n")
        self.clock.advance(1799)
        self.assertFalse(conn.closed)
        self.clock.advance(1)
        self.assertEqual(conn.take(), b"* BYE Autologout; idle for too long\r\n")
        self.assertTrue(conn.closed)

    def test_timer_stops_while_the_server_works(self) -> None:
        """A slow login is not the client's silence."""
        self.hold_logins = True
        conn = self.connect()
        conn.send(b"a LOGIN alice secret\r\n")
        self.clock.advance(5000)
        self.assertFalse(conn.closed)
        self.release_logins()
        self.assertEqual(conn.take(), LOGGED_IN)

    def test_connection_lost(self) -> None:
        """Disconnecting closes the view and logs out of the session."""
        conn = self.selected()
        conn.protocol.connectionLost()
        self.assertTrue(self.account.views[0].closed)
        self.assertEqual(self.sessions[0].logouts, 1)
        self.assertEqual(self.logs.debugs[-1][1], "disconnect")


# --- login ---------------------------------------------------------------------------------------


class LoginTests(IMAPTestCase):
    def test_login(self) -> None:
        conn = self.login()
        self.assertEqual(self.logins, [("alice", "IMAP-LOGIN")])
        self.assertEqual(self.account_requests, ["alice@example.test"])
        self.assertEqual(conn.protocol.client.identity, "alice@example.test")

    def test_login_with_literals(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.send(b"a LOGIN {5}\r\n"), b"+ Ready for literal data\r\n")
        self.assertEqual(conn.send(b"alice {6+}\r\nsecret\r\n"), LOGGED_IN)

    def test_login_failures(self) -> None:
        conn = self.connect()
        self.assertEqual(
            conn.send(b"a LOGIN alice wrong\r\n"), b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
        )
        self.assertEqual(
            conn.send(b"a LOGIN alice tempfail\r\n"),
            b"a NO [UNAVAILABLE] Temporary authentication failure\r\n",
        )
        self.assertEqual(
            conn.send(b'a LOGIN "" ""\r\n'), b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
        )
        self.assertEqual(conn.send(b"a LOGIN alice\r\n"), b"a BAD LOGIN: Missing password\r\n")
        self.assertEqual(conn.send(b"a SELECT INBOX\r\n"), b"a BAD SELECT: not authenticated\r\n")

    def test_failed_logins_count_as_errors(self) -> None:
        conn = self.connect()
        for _ in range(5):
            conn.send(b"a LOGIN alice wrong\r\n")
        self.assertEqual(
            conn.send(b"a LOGIN alice wrong\r\n"),
            b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n* BYE Too many errors\r\n",
        )
        self.assertTrue(conn.closed)

    def test_account_unavailable(self) -> None:
        """The mailbox store failing is never "wrong password"; the login is undone."""
        self.account_fails = True
        conn = self.connect()
        self.assertEqual(
            conn.send(b"a LOGIN alice secret\r\n"), b"a NO [UNAVAILABLE] Mailbox temporarily unavailable\r\n"
        )
        self.assertEqual(self.sessions[0].logouts, 1)
        self.assertEqual(self.logs.errors[0][0], "imap-account-error")
        self.flushLoggedErrors(OSError)
        self.assertEqual(conn.send(b'b LIST "" *\r\n'), b"b BAD LIST: not authenticated\r\n")

    def test_pipelined_commands_wait_for_the_login(self) -> None:
        self.hold_logins = True
        conn = self.connect()
        self.assertEqual(conn.send(b"a LOGIN alice secret\r\nb NAMESPACE\r\n"), b"")
        self.release_logins()
        self.assertEqual(
            conn.take(), LOGGED_IN + b'* NAMESPACE (("" "/")) NIL NIL\r\nb OK NAMESPACE completed\r\n'
        )

    def test_authenticate_plain(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.send(b"a AUTHENTICATE PLAIN\r\n"), b"+ \r\n")
        self.assertEqual(conn.send(b64(b"\0alice\0secret") + b"\r\n"), LOGGED_IN)
        self.assertEqual(self.logins, [("alice", "PLAIN")])

    def test_authenticate_initial_response(self) -> None:
        """SASL-IR (RFC 4959); ``=`` is an empty initial response."""
        conn = self.connect()
        self.assertEqual(conn.send(b"a AUTHENTICATE plain " + b64(b"\0alice\0secret") + b"\r\n"), LOGGED_IN)
        conn = self.connect()
        self.assertEqual(conn.send(b"a AUTHENTICATE PLAIN =\r\n"), b"a BAD Invalid SASL response\r\n")

    def test_authenticate_login_mechanism(self) -> None:
        conn = self.connect(listener="imaps", implicit_tls=True)
        self.assertEqual(conn.send(b"a AUTHENTICATE LOGIN\r\n"), b"+ " + b64(b"Username:") + b"\r\n")
        self.assertEqual(conn.send(b64(b"alice") + b"\r\n"), b"+ " + b64(b"Password:") + b"\r\n")
        self.assertEqual(conn.send(b64(b"secret") + b"\r\n"), LOGGED_IN)

    def test_authenticate_refusals(self) -> None:
        conn = self.connect(max_errors=50)
        self.assertEqual(
            conn.send(b"a AUTHENTICATE LOGIN\r\n"), b"a NO [PRIVACYREQUIRED] Mechanism requires TLS\r\n"
        )
        self.assertEqual(
            conn.send(b"a AUTHENTICATE X-NONE\r\n"), b"a NO Unsupported authentication mechanism\r\n"
        )
        self.assertEqual(
            conn.send(b"a AUTHENTICATE PLAIN\r\n*\r\n"), b"+ \r\na BAD Authentication cancelled\r\n"
        )
        self.assertEqual(
            conn.send(b"a AUTHENTICATE PLAIN\r\n!!\r\n"), b"+ \r\na BAD Invalid base64 in SASL response\r\n"
        )
        self.assertEqual(
            conn.send(b"a AUTHENTICATE PLAIN !!\r\n"),
            b"a BAD AUTHENTICATE: Invalid base64 in initial response\r\n",
        )
        self.assertEqual(
            conn.send(b"a AUTHENTICATE PLAIN " + b64(b"\0alice\0bad") + b"\r\n"),
            b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n",
        )
        self.assertEqual(
            conn.send(b"a AUTHENTICATE PLAIN\r\n" + b"A" * 5000 + b"\r\n"),
            b"+ \r\na BAD SASL response too long\r\n",
        )
        self.assertEqual(conn.send(b"b NOOP\r\n"), b"b OK NOOP completed\r\n")


class StartTLSTests(IMAPTestCase):
    def test_starttls(self) -> None:
        """I6: what was pipelined after STARTTLS is dropped, never run as if it came over TLS."""
        conn = self.connect()
        reply = conn.send(b"t STARTTLS\r\nx LOGIN alice secret\r\n")
        self.assertEqual(reply, b"t OK Begin TLS negotiation now\r\n")
        self.assertEqual(conn.transport.before_tls, reply)
        self.assertIs(conn.transport.tls_context, CONTEXT)
        self.assertEqual(self.logins, [])
        self.assertTrue(conn.protocol.client.tls)
        self.assertEqual(
            conn.send(b"c CAPABILITY\r\n"),
            f"* CAPABILITY {BASE_CAPS} AUTH=PLAIN AUTH=LOGIN\r\nc OK CAPABILITY completed\r\n".encode(),
        )
        self.assertEqual(conn.send(b"t STARTTLS\r\n"), b"t BAD STARTTLS: TLS already active\r\n")

    def test_not_offered(self) -> None:
        conn = self.connect(tls_context=None)
        self.assertEqual(conn.send(b"t STARTTLS\r\n"), b"t NO TLS not available\r\n")
        conn = self.login()
        self.assertEqual(conn.send(b"t STARTTLS\r\n"), b"t BAD STARTTLS: not valid in this state\r\n")


class SecurityPolicyTests(IMAPTestCase):
    """SPEC §5 on IMAP: the real policy, in the settings for LOGIN and the ``encrypted`` command
    restrictions, and through the real engine for AUTHENTICATE (as `kms.service` wires it)."""

    group = parse_group(["10.0.0.0/8"])
    engine_policy: SecurityPolicy | None = None  # set: sessions use the real engine with it

    def policy_connect(self, level: str, peer: str = "198.51.100.7", **changes: Any) -> Conn:
        self.engine_policy = SecurityPolicy(level, self.group)
        protocol = self.make_factory(policy=self.engine_policy, **changes).buildProtocol(None)
        transport = Transport()
        transport.peerAddr = IPv4Address("TCP", peer, 40000)
        protocol.makeConnection(transport)
        conn = Conn(self, protocol, transport)
        conn.take()
        return conn

    def session_factory(self, client: ClientInfo) -> FakeSession:
        session = super().session_factory(client)
        if self.engine_policy is not None:
            session.engine = SASLEngine(["CRAM-MD5", "PLAIN", "LOGIN"], engine_policy(self.engine_policy))
        return session

    def capabilities(self, conn: Conn) -> bytes:
        reply = conn.send(b"c CAPABILITY\r\n")
        self.assertTrue(reply.endswith(b"c OK CAPABILITY completed\r\n"), reply)
        return reply.split(b"\r\n")[0].removeprefix(f"* CAPABILITY {BASE_CAPS}".encode())

    def test_secure_auth_login_needs_tls(self) -> None:
        """Before TLS: LOGINDISABLED, only CRAM-MD5, LOGIN refused and logged; after STARTTLS all."""
        conn = self.policy_connect("secure_auth")
        self.assertEqual(self.capabilities(conn), b" STARTTLS AUTH=CRAM-MD5 LOGINDISABLED")
        self.assertEqual(
            conn.send(b"l LOGIN alice secret\r\n"),
            b"l NO [PRIVACYREQUIRED] Cleartext login is not allowed here\r\n",
        )
        self.assertEqual(
            conn.send(b"a AUTHENTICATE PLAIN\r\n"), b"a NO [PRIVACYREQUIRED] Mechanism requires TLS\r\n"
        )
        self.assertEqual(self.logins, [])
        self.assertEqual(
            self.logs.securities,
            [
                (
                    "mechanism-refused",
                    {"protocol": "imap", "method": "IMAP-LOGIN", "reason": "IMAP-LOGIN requires TLS"},
                )
            ],
        )
        conn.send(b"t STARTTLS\r\n")
        self.assertEqual(self.capabilities(conn), b" AUTH=CRAM-MD5 AUTH=PLAIN AUTH=LOGIN")
        self.assertEqual(conn.send(b"a LOGIN alice secret\r\n"), LOGGED_IN)

    def test_login_asks_the_policy_itself(self) -> None:
        """LOGIN is not SASL: refused by the policy even if the session's engine would allow PLAIN."""
        conn = self.connect(policy=SecurityPolicy("secure_auth"))
        self.assertIn(b"AUTH=PLAIN LOGINDISABLED", self.capabilities(conn))
        self.assertEqual(
            conn.send(b"l LOGIN alice secret\r\n"),
            b"l NO [PRIVACYREQUIRED] Cleartext login is not allowed here\r\n",
        )

    def test_encrypted_allows_only_tls_setup_before_tls(self) -> None:
        """CAPABILITY, NOOP, STARTTLS, LOGOUT only; the rest NO [PRIVACYREQUIRED] (unknown: BAD)."""
        conn = self.policy_connect("encrypted", max_errors=50)
        self.assertEqual(self.capabilities(conn), b" STARTTLS LOGINDISABLED")
        self.assertEqual(conn.send(b"n NOOP\r\n"), b"n OK NOOP completed\r\n")
        refused = b" NO [PRIVACYREQUIRED] Encryption required by security policy\r\n"
        for tag, command in [
            (b"l", b"LOGIN alice secret"),
            (b"a", b"AUTHENTICATE CRAM-MD5"),
            (b"s", b"SELECT INBOX"),
            (b"u", b"UID FETCH 1 FLAGS"),
            (b"i", b"ID NIL"),
        ]:
            self.assertEqual(conn.send(tag + b" " + command + b"\r\n"), tag + refused, command)
        self.assertEqual(conn.send(b"x XYZZY\r\n"), b"x BAD Unknown command XYZZY\r\n")
        self.assertEqual(self.logins, [])
        self.assertEqual(
            [fields["command"] for event, fields in self.logs.securities if event == "command-refused"],
            ["LOGIN", "AUTHENTICATE", "SELECT", "UID FETCH", "ID"],
        )
        self.assertEqual(conn.send(b"t STARTTLS\r\n"), b"t OK Begin TLS negotiation now\r\n")
        self.assertEqual(conn.send(b"a LOGIN alice secret\r\n"), LOGGED_IN)
        self.assertIn(b"s OK [READ-WRITE] SELECT completed\r\n", conn.send(b"s SELECT INBOX\r\n"))
        self.assertEqual(conn.send(b"x LOGOUT\r\n"), b"* BYE Logging out\r\nx OK LOGOUT completed\r\n")

    def test_logout_before_tls(self) -> None:
        conn = self.policy_connect("encrypted")
        self.assertEqual(conn.send(b"x LOGOUT\r\n"), b"* BYE Logging out\r\nx OK LOGOUT completed\r\n")
        self.assertTrue(conn.closed)

    def test_exempt_and_implicit_tls(self) -> None:
        """A client of the exception group, or one on imaps, logs in as if there were no policy."""
        conn = self.policy_connect("encrypted", peer="10.0.0.7")
        self.assertEqual(self.capabilities(conn), b" STARTTLS AUTH=CRAM-MD5 AUTH=PLAIN AUTH=LOGIN")
        self.assertEqual(conn.send(b"a LOGIN alice secret\r\n"), LOGGED_IN)
        conn = self.policy_connect("encrypted", listener="imaps", implicit_tls=True)
        self.assertEqual(conn.send(b"a LOGIN alice secret\r\n"), LOGGED_IN)
        self.assertEqual(self.logs.securities, [])


# --- authenticated state -------------------------------------------------------------------------


class MailboxTests(IMAPTestCase):
    def test_namespace_and_enable(self) -> None:
        """I7: one personal namespace, NIL for other users and shared."""
        conn = self.login()
        self.assertEqual(
            conn.send(b"n NAMESPACE\r\n"), b'* NAMESPACE (("" "/")) NIL NIL\r\nn OK NAMESPACE completed\r\n'
        )
        self.assertEqual(conn.send(b"e ENABLE CONDSTORE\r\n"), b"* ENABLED\r\ne OK ENABLE completed\r\n")
        self.assertEqual(conn.send(b"e ENABLE\r\n"), b"e BAD ENABLE: Invalid capability list\r\n")

    def test_list(self) -> None:
        """Attributes (children, SPECIAL-USE), "/" delimiter, modified UTF-7 names, INBOX first."""
        conn = self.login()
        self.assertEqual(
            conn.lines(b'l LIST "" *\r\n'),
            [
                b'* LIST (\\HasNoChildren) "/" "INBOX"',
                b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"',
                b'* LIST (\\HasNoChildren \\Trash) "/" "Trash"',
                b'* LIST (\\HasChildren \\Noselect) "/" "a"',
                b'* LIST (\\HasNoChildren) "/" "a/b"',
                b'* LIST (\\HasNoChildren) "/" "&AOk-t&AOk-"',
                b"l OK LIST completed",
            ],
        )
        self.assertEqual(
            conn.lines(b'l LIST "" %\r\n')[3:5],
            [b'* LIST (\\HasChildren \\Noselect) "/" "a"', b'* LIST (\\HasNoChildren) "/" "&AOk-t&AOk-"'],
        )
        self.assertEqual(
            conn.lines(b"l LIST a/ %\r\n"), [b'* LIST (\\HasNoChildren) "/" "a/b"', b"l OK LIST completed"]
        )
        self.assertEqual(
            conn.lines(b'l LIST "" inbox\r\n'),
            [b'* LIST (\\HasNoChildren) "/" "INBOX"', b"l OK LIST completed"],
        )
        self.assertEqual(
            conn.send(b'l LIST "" ""\r\n'), b'* LIST (\\Noselect) "/" ""\r\nl OK LIST completed\r\n'
        )
        self.assertEqual(
            conn.send(b'l LIST "" &AOk\r\n'), b"l BAD LIST: Invalid mailbox pattern (modified UTF-7)\r\n"
        )

    def test_lsub(self) -> None:
        conn = self.login()
        self.assertEqual(conn.send(b"u UNSUBSCRIBE Sent\r\n"), b"u OK UNSUBSCRIBE completed\r\n")
        self.assertEqual(conn.lines(b'l LSUB "" S*\r\n'), [b"l OK LSUB completed"])
        self.assertEqual(conn.send(b"u SUBSCRIBE Sent\r\n"), b"u OK SUBSCRIBE completed\r\n")
        self.assertEqual(
            conn.lines(b'l LSUB "" S*\r\n'),
            [b'* LSUB (\\HasNoChildren \\Sent) "/" "Sent"', b"l OK LSUB completed"],
        )

    def test_lsub_noselect_parents_only_for_percent(self) -> None:
        """RFC 3501 §6.3.9: "a/b" subscribed, "a" no folder: "%" stops at "a" and must list it
        \\Noselect; "*" reaches "a/b" itself and must not list "a"."""
        conn = self.login()
        self.assertEqual(
            conn.lines(b'l LSUB "" *\r\n')[3:],
            [
                b'* LSUB (\\HasNoChildren) "/" "a/b"',
                b'* LSUB (\\HasNoChildren) "/" "&AOk-t&AOk-"',
                b"l OK LSUB completed",
            ],
        )
        self.assertEqual(
            conn.lines(b'l LSUB "" %\r\n')[3:],
            [
                b'* LSUB (\\HasChildren \\Noselect) "/" "a"',
                b'* LSUB (\\HasNoChildren) "/" "&AOk-t&AOk-"',
                b"l OK LSUB completed",
            ],
        )
        self.assertEqual(
            conn.lines(b"l LSUB a/ %\r\n"), [b'* LSUB (\\HasNoChildren) "/" "a/b"', b"l OK LSUB completed"]
        )
        self.assertEqual(conn.lines(b'l LSUB "" a\r\n'), [b"l OK LSUB completed"])  # no "%" hid anything

    def test_create_delete_rename(self) -> None:
        conn = self.login()
        self.assertEqual(conn.send(b"c CREATE &AOk-x/\r\n"), b"c OK CREATE completed\r\n")
        self.assertEqual(conn.send(b"c CREATE Sent\r\n"), b"c NO [ALREADYEXISTS] mailbox exists\r\n")
        self.assertEqual(conn.send(b"r RENAME &AOk-x Done\r\n"), b"r OK RENAME completed\r\n")
        self.assertEqual(conn.send(b"d DELETE Done\r\n"), b"d OK DELETE completed\r\n")
        self.assertEqual(conn.send(b"d DELETE Done\r\n"), b"d NO [NONEXISTENT] no such mailbox\r\n")
        self.assertEqual(
            conn.send(b"d DELETE &AOk\r\n"), b"d BAD DELETE: Invalid mailbox name (modified UTF-7)\r\n"
        )
        self.assertEqual(
            self.account.calls,
            [
                ("create", "éx"),
                ("create", "Sent"),
                ("rename", "éx", "Done"),
                ("delete", "Done"),
                ("delete", "Done"),
            ],
        )

    def test_status(self) -> None:
        self.fill(3)
        conn = self.login()
        self.assertEqual(
            conn.send(b"s STATUS inbox (UIDNEXT MESSAGES UNSEEN RECENT UIDVALIDITY APPENDLIMIT)\r\n"),
            b'* STATUS "INBOX" (UIDNEXT 4 MESSAGES 3 UNSEEN 3 RECENT 3 UIDVALIDITY 7 APPENDLIMIT 10000)\r\n'
            b"s OK STATUS completed\r\n",
        )
        self.assertEqual(conn.send(b"s STATUS INBOX (BOGUS)\r\n"), b"s BAD STATUS: Invalid status item\r\n")
        self.assertEqual(
            conn.send(b"s STATUS Nope (MESSAGES)\r\n"), b"s NO [NONEXISTENT] no such mailbox\r\n"
        )

    def test_append(self) -> None:
        conn = self.login()
        message = mail()
        self.assertEqual(
            conn.send(b'p APPEND Sent (\\Seen $Work) " 1-Feb-2022 11:00:00 +0100" {%d}\r\n' % len(message)),
            b"+ Ready for literal data\r\n",
        )
        self.assertEqual(conn.send(message + b"\r\n"), b"p OK [APPENDUID 8 1] APPEND completed\r\n")
        self.assertEqual(self.account.calls[-1], ("append", "Sent", message, ["\\Seen", "$Work"], DATE))
        self.assertEqual(
            conn.send(b"p APPEND Sent {3+}\r\nabc\r\n"), b"p OK [APPENDUID 8 2] APPEND completed\r\n"
        )

    def test_append_to_the_selected_folder(self) -> None:
        """The new message is announced before the tagged OK."""
        self.fill(1)
        conn = self.selected()
        self.assertEqual(
            conn.send(b"p APPEND INBOX {3+}\r\nabc\r\n"),
            b"* 2 EXISTS\r\np OK [APPENDUID 7 2] APPEND completed\r\n",
        )

    def test_append_trycreate(self) -> None:
        """I3: the client gets NO [TRYCREATE], not BAD."""
        conn = self.login()
        self.assertEqual(conn.send(b"p APPEND Nope {3+}\r\nabc\r\n"), b"p NO [TRYCREATE] no such mailbox\r\n")

    def test_append_too_big(self) -> None:
        """Over APPENDLIMIT: NO [TOOBIG] and no continuation, so the client never sends it."""
        conn = self.login()
        self.assertEqual(conn.send(b"p APPEND Sent {10001}\r\n"), b"p NO [TOOBIG] Message too large\r\n")
        self.assertEqual(conn.send(b"n NOOP\r\n"), b"n OK NOOP completed\r\n")
        self.assertEqual(conn.send(b"p APPEND Sent {5000}\r\n"), b"+ Ready for literal data\r\n")

    def test_append_syntax(self) -> None:
        conn = self.login(max_errors=50)
        for line, reply in [
            (b'p APPEND Sent "text"\r\n', b"p BAD APPEND: The message must be a literal\r\n"),
            (b"p APPEND Sent (\\Recent) {1+}\r\nx\r\n", b"p BAD APPEND: Invalid system flag \\Recent\r\n"),
            (b'p APPEND Sent "yesterday" {1+}\r\nx\r\n', b"p BAD APPEND: Invalid date-time\r\n"),
            (b"p APPEND Sent {1+}\r\nx extra\r\n", b"p BAD APPEND: Unexpected extra arguments\r\n"),
        ]:
            self.assertEqual(conn.send(line), reply, line)


# --- selected state ------------------------------------------------------------------------------


class ListSelectionTests(TestCase):
    """`list_selection`, the pure part of LIST and LSUB, on what the real store lists."""

    FOLDERS = [
        FolderListing("INBOX", frozenset({"\\HasNoChildren"}), True),
        FolderListing("a", frozenset({"\\HasChildren", "\\Noselect"}), False),  # implied by a/b/c
        FolderListing("a/b", frozenset({"\\HasChildren"}), False),
        FolderListing("a/b/c", frozenset({"\\HasNoChildren"}), True),
        FolderListing("Gone", frozenset({"\\NonExistent", "\\HasNoChildren"}), True),  # deleted, subscribed
        FolderListing("x/Gone", frozenset({"\\NonExistent", "\\HasNoChildren"}), True),
    ]

    def select(self, pattern: str, lsub: bool) -> list[str]:
        wide = list_matcher("", pattern.replace("%", "*")) if lsub else None
        return [f.name for f in list_selection(self.FOLDERS, list_matcher("", pattern), wide)]

    def test_list(self) -> None:
        """Existing folders only: a subscribed name that is no folder is LSUB's business."""
        self.assertEqual(self.select("*", lsub=False), ["INBOX", "a", "a/b", "a/b/c"])
        self.assertEqual(self.select("%", lsub=False), ["INBOX", "a"])

    def test_lsub(self) -> None:
        cases = {
            "*": ["INBOX", "Gone", "a/b/c", "x/Gone"],
            "%": ["INBOX", "Gone", "a", "x"],
            "a/%": ["a/b"],
            "a/%/%": ["a/b/c"],
            "a/*": ["a/b/c"],
            "a": [],
            "%/Gone": ["x/Gone"],
        }
        for pattern, names in cases.items():
            with self.subTest(pattern=pattern):
                self.assertEqual(self.select(pattern, lsub=True), names)
        implied = list_selection(self.FOLDERS, list_matcher("", "%"), list_matcher("", "*"))[2]
        self.assertEqual(implied, FolderListing("a", frozenset({"\\HasChildren", "\\Noselect"}), False))


class SelectTests(IMAPTestCase):
    def test_select(self) -> None:
        self.inbox.add(mail("one"), ["\\Seen"])
        self.inbox.add(mail("two"), ["$Work"])
        conn = self.login()
        self.assertEqual(
            conn.lines(b"s SELECT INBOX\r\n"),
            [
                b"* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $Work)",
                b"* OK [PERMANENTFLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $Work \\*)]"
                b" Flags permitted",
                b"* 2 EXISTS",
                b"* 2 RECENT",
                b"* OK [UNSEEN 2] First unseen",
                b"* OK [UIDVALIDITY 7] UIDs valid",
                b"* OK [UIDNEXT 3] Predicted next UID",
                b"s OK [READ-WRITE] SELECT completed",
            ],
        )

    def test_examine(self) -> None:
        conn = self.login()
        self.assertEqual(
            conn.lines(b"e EXAMINE Sent\r\n"),
            [
                b"* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft)",
                b"* OK [PERMANENTFLAGS ()] Flags permitted",
                b"* 0 EXISTS",
                b"* 0 RECENT",
                b"* OK [UIDVALIDITY 8] UIDs valid",
                b"* OK [UIDNEXT 1] Predicted next UID",
                b"e OK [READ-ONLY] EXAMINE completed",
            ],
        )

    def test_failed_select_leaves_no_folder_selected(self) -> None:
        conn = self.selected()
        self.assertEqual(conn.send(b"s SELECT Nope\r\n"), b"s NO [NONEXISTENT] no such mailbox\r\n")
        self.assertTrue(self.account.views[0].closed)
        self.assertEqual(conn.send(b"f FETCH 1 FLAGS\r\n"), b"f BAD FETCH: not valid in this state\r\n")

    def test_unselect_and_close(self) -> None:
        """UNSELECT keeps \\Deleted messages; CLOSE expunges them without EXPUNGE responses."""
        self.fill(2, flags=["\\Deleted"])
        conn = self.selected()
        self.assertEqual(conn.send(b"u UNSELECT\r\n"), b"u OK UNSELECT completed\r\n")
        self.assertEqual(len(self.inbox.messages), 2)
        conn.send(b"s SELECT INBOX\r\n")
        self.assertEqual(conn.send(b"c CLOSE\r\n"), b"c OK CLOSE completed\r\n")
        self.assertEqual(self.inbox.messages, [])
        self.assertTrue(all(view.closed for view in self.account.views))

    def test_close_read_only(self) -> None:
        self.fill(1, flags=["\\Deleted"])
        conn = self.login()
        conn.send(b"e EXAMINE INBOX\r\n")
        self.assertEqual(conn.send(b"c CLOSE\r\n"), b"c OK CLOSE completed\r\n")
        self.assertEqual(len(self.inbox.messages), 1)


class FetchTests(IMAPTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.first = self.inbox.add(mail("one"), ["\\Seen"])
        self.second = self.inbox.add(mail("two", body="Second body, longer text."))

    def test_index_items(self) -> None:
        conn = self.selected()
        self.assertEqual(
            conn.lines(b"f FETCH 1:* (FLAGS UID INTERNALDATE RFC822.SIZE)\r\n"),
            [
                b'* 1 FETCH (UID 1 FLAGS (\\Seen) INTERNALDATE "01-Feb-2022 10:00:00 +0000" RFC822.SIZE %d)'
                % self.first.size,
                b'* 2 FETCH (UID 2 FLAGS () INTERNALDATE "01-Feb-2022 10:00:00 +0000" RFC822.SIZE %d)'
                % self.second.size,
                b"f OK FETCH completed",
            ],
        )
        self.assertEqual(self.account.opened, [])

    def test_structures_from_the_cache(self) -> None:
        """ENVELOPE, BODY, BODYSTRUCTURE come from meta: no message is opened."""
        conn = self.selected()
        meta = self.inbox.metas[2]
        self.assertEqual(
            conn.send(b"f FETCH 2 (ENVELOPE BODY BODYSTRUCTURE)\r\n"),
            b"* 2 FETCH (ENVELOPE %b BODY %b BODYSTRUCTURE %b)\r\nf OK FETCH completed\r\n"
            % tuple(str(meta[name]).encode() for name in ("ENVELOPE", "BODY", "BODYSTRUCTURE")),
        )
        self.assertEqual(self.account.opened, [])
        self.assertEqual(self.account.detail_loads, 1)

    def test_damaged_cache_row_still_answers(self) -> None:
        """A message whose cached meta is lost gets NIL structures, not a failed FETCH."""
        info = self.second
        self.inbox.metas[2] = {}
        conn = self.selected()
        self.assertEqual(
            conn.send(b"f FETCH 2 (ENVELOPE BODYSTRUCTURE)\r\n"),
            b"* 2 FETCH (ENVELOPE (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL) "
            b'BODYSTRUCTURE ("TEXT" "PLAIN" NIL NIL NIL "7BIT" %d 0))\r\n'
            % info.size
            + b"f OK FETCH completed\r\n",
        )

    def test_macros(self) -> None:
        conn = self.selected()
        fast = conn.send(b"f FETCH 1 FAST\r\n")
        self.assertEqual(
            fast,
            b'* 1 FETCH (FLAGS (\\Seen) INTERNALDATE "01-Feb-2022 10:00:00 +0000" RFC822.SIZE %d)\r\n'
            b"f OK FETCH completed\r\n" % self.first.size,
        )
        self.assertIn(b" ENVELOPE (", conn.send(b"f FETCH 1 ALL\r\n"))
        self.assertIn(b" BODY (", conn.send(b"f FETCH 1 FULL\r\n"))

    def test_uid_fetch(self) -> None:
        """UID FETCH always reports UID; absent UIDs are skipped; n:* covers the last UID."""
        conn = self.selected()
        self.assertEqual(
            conn.send(b"f UID FETCH 2:4 FLAGS\r\n"), b"* 2 FETCH (UID 2 FLAGS ())\r\nf OK FETCH completed\r\n"
        )
        self.assertEqual(
            conn.send(b"f UID FETCH 9:* FLAGS\r\n"), b"* 2 FETCH (UID 2 FLAGS ())\r\nf OK FETCH completed\r\n"
        )
        self.assertEqual(conn.send(b"f UID FETCH 7 FLAGS\r\n"), b"f OK FETCH completed\r\n")

    def test_body_sets_seen(self) -> None:
        """I2: a non-PEEK BODY[] sets \\Seen, and the FETCH reports the new FLAGS."""
        conn = self.selected()
        wire = self.inbox.bodies[2]
        self.assertEqual(
            conn.send(b"f FETCH 2 BODY[]\r\n"),
            b"* 2 FETCH (FLAGS (\\Seen) BODY[] {%d}\r\n%b)\r\nf OK FETCH completed\r\n" % (len(wire), wire),
        )
        self.assertEqual(self.inbox.messages[1].flags, {"\\Seen"})
        self.assertEqual(self.account.calls, [("store", [2], ["\\Seen"], "+")])

    def test_peek_and_examine_leave_seen_alone(self) -> None:
        conn = self.selected()
        wire = self.inbox.bodies[2]
        self.assertEqual(
            conn.send(b"f FETCH 2 BODY.PEEK[]\r\n"),
            b"* 2 FETCH (BODY[] {%d}\r\n%b)\r\nf OK FETCH completed\r\n" % (len(wire), wire),
        )
        conn.send(b"e EXAMINE INBOX\r\n")
        conn.send(b"f FETCH 2 RFC822\r\n")
        self.assertEqual(self.inbox.messages[1].flags, frozenset())
        self.assertEqual(self.account.calls, [])

    def test_partial_fetch(self) -> None:
        """I1: ``BODY[]<0.10>`` answers with the label ``BODY[]<0>`` and 10 octets."""
        conn = self.selected()
        wire = self.inbox.bodies[1]
        self.assertEqual(
            conn.send(b"f FETCH 1 (BODY.PEEK[]<0.10> BODY.PEEK[TEXT]<4.100>)\r\n"),
            b"* 1 FETCH (BODY[]<0> {10}\r\n%b BODY[TEXT]<4> {8}\r\no Bob.\r\n)\r\nf OK FETCH completed\r\n"
            % wire[:10],
        )
        self.assertEqual(
            conn.send(b"f FETCH 1 BODY.PEEK[]<5000.10>\r\n"),
            b"* 1 FETCH (BODY[]<5000> {0}\r\n)\r\nf OK FETCH completed\r\n",
        )

    def test_header_field_name_as_a_literal(self) -> None:
        """header-fld-name is an astring: a literal inside BODY[HEADER.FIELDS (...)] is accepted."""
        conn = self.selected()
        self.assertEqual(
            conn.send(b"f FETCH 2 (BODY.PEEK[HEADER.FIELDS ({7}\r\n"), b"+ Ready for literal data\r\n"
        )
        self.assertEqual(
            conn.send(b"Subject)] UID)\r\n"),
            b"* 2 FETCH (UID 2 BODY[HEADER.FIELDS (Subject)] {16}\r\nSubject: two\r\n\r\n)\r\n"
            b"f OK FETCH completed\r\n",
        )
        self.assertEqual(
            conn.send(b"f FETCH 2 BODY.PEEK[HEADER.FIELDS ({3+}\r\nA B)]\r\n"),
            b"f BAD Invalid header field name\r\n",  # found while reading the tokens
        )

    def test_header_fields_from_the_cache(self) -> None:
        conn = self.selected()
        self.assertEqual(
            conn.send(b"f FETCH 1:2 (BODY.PEEK[HEADER.FIELDS (SUBJECT from)])\r\n"),
            b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT from)] {54}\r\n"
            b"From: Ann Example <ann@example.test>\r\nSubject: one\r\n\r\n)\r\n"
            b"* 2 FETCH (BODY[HEADER.FIELDS (SUBJECT from)] {54}\r\n"
            b"From: Ann Example <ann@example.test>\r\nSubject: two\r\n\r\n)\r\n"
            b"f OK FETCH completed\r\n",
        )
        self.assertEqual(self.account.opened, [])
        header = conn.send(b"f FETCH 1 RFC822.HEADER\r\n")
        self.assertEqual(
            header,
            b"* 1 FETCH (RFC822.HEADER {%d}\r\n%b)\r\nf OK FETCH completed\r\n"
            % (len(self.first.headers), self.first.headers),
        )
        self.assertEqual(self.account.opened, [])

    def test_non_ascii_headers(self) -> None:
        """I4: 8-bit header bytes go out as counted literals; the connection survives."""
        wire = b"Subject: caf\xe9 \xc3\xa9t\xc3\xa9\r\nFrom: \xff <x@y>\r\n\r\nbody\r\n"
        self.inbox.add(wire)
        conn = self.selected()
        subject = b"Subject: caf\xe9 \xc3\xa9t\xc3\xa9\r\n\r\n"
        self.assertEqual(
            conn.send(b"f FETCH 3 (BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[HEADER])\r\n"),
            b"* 3 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {%d}\r\n%b BODY[HEADER] {%d}\r\n%b)\r\n"
            b"f OK FETCH completed\r\n" % (len(subject), subject, len(wire) - 6, wire[:-6]),
        )
        self.assertIn(b"* 3 FETCH (ENVELOPE (", conn.send(b"f FETCH 3 ENVELOPE\r\n"))
        self.assertFalse(conn.closed)

    def test_rfc822_text_and_parts(self) -> None:
        conn = self.selected()
        self.assertEqual(
            conn.send(b"f FETCH 1 (RFC822.TEXT BODY.PEEK[1])\r\n"),
            b"* 1 FETCH (FLAGS (\\Seen) RFC822.TEXT {12}\r\nHello Bob.\r\n"
            b" BODY[1] {12}\r\nHello Bob.\r\n)\r\n"
            b"f OK FETCH completed\r\n",
        )

    def test_message_expunged_by_another_session(self) -> None:
        """The snapshot still lists it; its file is gone: the others are fetched, then NO."""
        conn = self.selected()
        other = self.selected()
        other.send(b"x STORE 1 +FLAGS.SILENT (\\Deleted)\r\n")
        other.send(b"x EXPUNGE\r\n")
        reply = conn.send(b"f FETCH 1:2 BODY.PEEK[TEXT]\r\n")
        self.assertEqual(
            reply,
            b"* 2 FETCH (BODY[TEXT] {27}\r\nSecond body, longer text.\r\n)\r\n"
            b"f NO [EXPUNGEISSUED] Some messages could not be fetched\r\n",
        )

    def test_read_error(self) -> None:
        """A batch the store cannot read is logged and reported like messages expunged meanwhile."""
        conn = self.selected()
        self.account.read_error = PermissionError(13, "Permission denied")
        self.assertEqual(
            conn.send(b"f FETCH 1:2 (UID BODY.PEEK[TEXT])\r\n"),
            b"f NO [EXPUNGEISSUED] Some messages could not be fetched\r\n",
        )
        self.assertEqual(self.logs.errors[0][0], "imap-read-error")
        self.flushLoggedErrors(PermissionError)
        self.account.read_error = None
        self.assertIn(b"f OK FETCH completed", conn.send(b"f FETCH 1 BODY.PEEK[TEXT]\r\n"))

    def test_fetch_syntax(self) -> None:
        conn = self.selected()
        self.assertEqual(
            conn.send(b"f FETCH 1 (BOGUS)\r\n"), b"f BAD FETCH: Unknown fetch attribute BOGUS\r\n"
        )
        self.assertEqual(conn.send(b"f FETCH 1\r\n"), b"f BAD FETCH: Missing fetch attributes\r\n")


class SequenceNumberTests(IMAPTestCase):
    def test_bad_sets(self) -> None:
        self.fill(2)
        conn = self.selected(factory=self.make_factory(max_errors=50))
        for line in [b"f FETCH 3 FLAGS\r\n", b"f FETCH 1:3 FLAGS\r\n", b"f FETCH 2,5:* FLAGS\r\n"]:
            self.assertEqual(conn.send(line), b"f BAD FETCH: Invalid message sequence number\r\n", line)
        for line in [b"f FETCH 0 FLAGS\r\n", b"f FETCH x FLAGS\r\n", b"f FETCH 4294967296 FLAGS\r\n"]:
            self.assertEqual(conn.send(line), b"f BAD FETCH: Invalid sequence set\r\n", line)

    def test_empty_mailbox(self) -> None:
        conn = self.selected()
        self.assertEqual(
            conn.send(b"f FETCH 1:* FLAGS\r\n"), b"f BAD FETCH: Invalid message sequence number\r\n"
        )
        self.assertEqual(conn.send(b"f UID FETCH 1:* FLAGS\r\n"), b"f OK FETCH completed\r\n")
        self.assertEqual(conn.send(b"s SEARCH ALL\r\n"), b"* SEARCH\r\ns OK SEARCH completed\r\n")


class StoreTests(IMAPTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.fill(3)

    def test_store(self) -> None:
        """STORE reports the new flags (Twisted's fallback path wrote with ``transport.writen``, I8)."""
        conn = self.selected()
        self.assertEqual(
            conn.send(b"s STORE 1:2 +FLAGS (\\Flagged $Work)\r\n"),
            flags_lines("$Work")
            + b"* 1 FETCH (FLAGS ($Work \\Flagged))\r\n* 2 FETCH (FLAGS ($Work \\Flagged))\r\n"
            b"s OK STORE completed\r\n",
        )
        self.assertEqual(
            conn.send(b"s UID STORE 2 -FLAGS $Work\r\n"),
            b"* 2 FETCH (UID 2 FLAGS (\\Flagged))\r\ns OK STORE completed\r\n",
        )
        self.assertEqual(conn.send(b"s STORE 3 FLAGS.SILENT (\\Seen)\r\n"), b"s OK STORE completed\r\n")
        self.assertEqual(
            [m.flags for m in self.inbox.messages], [{"\\Flagged", "$Work"}, {"\\Flagged"}, {"\\Seen"}]
        )

    def test_store_numbers_a_scattered_set(self) -> None:
        """The responses carry this client's sequence numbers, for a run of messages and for a set
        with gaps alike (after an expunge, UIDs and numbers differ)."""
        self.fill(3)  # six messages
        conn = self.selected()
        conn.send(b"s STORE 2 +FLAGS.SILENT (\\Deleted)\r\ne EXPUNGE\r\n")
        self.assertEqual(
            conn.send(b"s STORE 1,3:4 +FLAGS (\\Seen)\r\n"),
            b"* 1 FETCH (FLAGS (\\Seen))\r\n* 3 FETCH (FLAGS (\\Seen))\r\n* 4 FETCH (FLAGS (\\Seen))\r\n"
            b"s OK STORE completed\r\n",
        )
        self.assertEqual(  # the changed ones as the store reports them, then the unchanged
            conn.send(b"s UID STORE 1:* -FLAGS (\\Seen)\r\n"),
            b"* 1 FETCH (UID 1 FLAGS ())\r\n* 3 FETCH (UID 4 FLAGS ())\r\n* 4 FETCH (UID 5 FLAGS ())\r\n"
            b"* 2 FETCH (UID 3 FLAGS ())\r\n* 5 FETCH (UID 6 FLAGS ())\r\ns OK STORE completed\r\n",
        )

    def test_new_keyword_from_another_session(self) -> None:
        """A keyword new to the folder: FLAGS and PERMANENTFLAGS with it, before the FETCH showing it."""
        conn = self.selected()
        other = self.selected()
        other.send(b"s STORE 2 +FLAGS.SILENT ($Junk)\r\n")
        self.assertEqual(
            conn.send(b"n NOOP\r\n"),
            flags_lines("$Junk") + b"* 2 FETCH (UID 2 FLAGS ($Junk))\r\nn OK NOOP completed\r\n",
        )
        other.send(b"s STORE 3 +FLAGS.SILENT ($Junk)\r\n")  # known by now: no second FLAGS
        self.assertEqual(
            conn.send(b"n NOOP\r\n"), b"* 3 FETCH (UID 3 FLAGS ($Junk))\r\nn OK NOOP completed\r\n"
        )
        self.assertEqual(
            conn.send(b"s STORE 1 -FLAGS ($Junk $Other)\r\n"),
            b"* 1 FETCH (FLAGS ())\r\ns OK STORE completed\r\n",
        )

    def test_new_keyword_in_new_message_and_read_only(self) -> None:
        """A message arriving with a new keyword; a read-only session hears of it too, still with
        no permanent flags."""
        conn = self.login()
        conn.send(b"e EXAMINE INBOX\r\n")
        self.inbox.add(mail("new"), ["$Label1", "\\Seen"])
        self.assertEqual(
            conn.send(b"n NOOP\r\n"),
            b"* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $Label1)\r\n"
            b"* OK [PERMANENTFLAGS ()] Flags permitted\r\n* 4 EXISTS\r\nn OK NOOP completed\r\n",
        )

    def test_new_keyword_while_idling(self) -> None:
        conn = self.selected()
        conn.send(b"i IDLE\r\n")
        self.selected().send(b"s STORE 1 +FLAGS.SILENT (\\Seen work)\r\n")
        self.assertEqual(
            conn.take(),
            flags_lines("work") + b"* 1 FETCH (UID 1 FLAGS (\\Seen work))\r\n",
        )

    def test_long_uid_store(self) -> None:
        """A 20 KiB set of UIDs is one command (Twisted drops the connection, audit §3.3)."""
        conn = self.selected(factory=self.make_factory(max_line=MAX_LINE))
        uids = b",".join(b"%d" % n for n in range(1, 8000, 2))
        self.assertEqual(
            conn.send(b"s UID STORE " + uids + b" +FLAGS.SILENT (\\Seen)\r\n"), b"s OK STORE completed\r\n"
        )
        self.assertEqual(self.account.calls[-1], ("store", [1, 3], ["\\Seen"], "+"))

    def test_read_only(self) -> None:
        conn = self.login()
        conn.send(b"e EXAMINE INBOX\r\n")
        self.assertEqual(conn.send(b"s STORE 1 +FLAGS (\\Seen)\r\n"), b"s NO Mailbox is read-only\r\n")
        self.assertEqual(conn.send(b"x EXPUNGE\r\n"), b"x NO Mailbox is read-only\r\n")

    def test_other_sessions_hear_of_it(self) -> None:
        conn = self.selected()
        other = self.selected()
        conn.send(b"s STORE 2 +FLAGS.SILENT (\\Answered)\r\n")
        self.assertEqual(
            other.send(b"n NOOP\r\n"), b"* 2 FETCH (UID 2 FLAGS (\\Answered))\r\nn OK NOOP completed\r\n"
        )


class SearchTests(IMAPTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.inbox.add(mail("apples", sender="Ann <ann@example.test>"), ["\\Seen"])
        self.inbox.add(mail("pears", sender="Bob <bob@example.test>", body="Grüße aus Köln"))
        self.inbox.add(mail("plums", sender="=?utf-8?q?J=C3=BCrgen?= <j@example.test>"))

    def test_search(self) -> None:
        conn = self.selected()
        self.assertEqual(conn.send(b"s SEARCH ALL\r\n"), b"* SEARCH 1 2 3\r\ns OK SEARCH completed\r\n")
        self.assertEqual(conn.send(b"s SEARCH UNSEEN\r\n"), b"* SEARCH 2 3\r\ns OK SEARCH completed\r\n")
        self.assertEqual(conn.send(b"s UID SEARCH 2:*\r\n"), b"* SEARCH 2 3\r\ns OK SEARCH completed\r\n")
        self.assertEqual(conn.send(b"s SEARCH SUBJECT nothing\r\n"), b"* SEARCH\r\ns OK SEARCH completed\r\n")
        self.assertEqual(self.account.opened, [])

    def test_header_search(self) -> None:
        """I5: header keys work (from the cached, decoded header texts)."""
        conn = self.selected()
        self.assertEqual(conn.send(b"s SEARCH FROM bob\r\n"), b"* SEARCH 2\r\ns OK SEARCH completed\r\n")
        self.assertEqual(conn.send(b"s SEARCH CHARSET UTF-8 FROM {6}\r\n"), b"+ Ready for literal data\r\n")
        self.assertEqual(
            conn.send("jürgen\r\n".encode()[:6] + b"\r\n"), b"* SEARCH 3\r\ns OK SEARCH completed\r\n"
        )
        self.assertEqual(
            conn.send(b's SEARCH OR SUBJECT pears HEADER Subject "APPLES"\r\n'),
            b"* SEARCH 1 2\r\ns OK SEARCH completed\r\n",
        )

    def test_body_search_reads_messages(self) -> None:
        conn = self.selected()
        self.assertEqual(
            conn.send("s SEARCH BODY köln\r\n".encode()), b"* SEARCH 2\r\ns OK SEARCH completed\r\n"
        )
        self.assertEqual(sorted(self.account.opened), [1, 2, 3])

    def test_search_refusals(self) -> None:
        conn = self.selected()
        for charset in (b"KLINGON", b"ISO-8859-1"):  # one rule, in the parser: US-ASCII and UTF-8 only
            self.assertEqual(
                conn.send(b's SEARCH CHARSET %b FROM "J\xfcrgen"\r\n' % charset),
                b"s NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset\r\n",
            )
        self.assertEqual(
            conn.send(b"s SEARCH CHARSET us-ascii FROM bob\r\n"), b"* SEARCH 2\r\ns OK SEARCH completed\r\n"
        )
        self.assertEqual(conn.send(b"s SEARCH BOGUS\r\n"), b"s BAD SEARCH: Unknown search key BOGUS\r\n")


class ExpungeTests(IMAPTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.fill(5)
        for index in (1, 2, 4):  # UIDs 2, 3, 5
            self.inbox.messages[index] = dataclasses.replace(
                self.inbox.messages[index], flags=frozenset({"\\Deleted"})
            )

    def test_expunge(self) -> None:
        """Sequence numbers are adjusted as each EXPUNGE goes out."""
        conn = self.selected()
        self.assertEqual(
            conn.send(b"x EXPUNGE\r\n"),
            b"* 2 EXPUNGE\r\n* 2 EXPUNGE\r\n* 3 EXPUNGE\r\nx OK EXPUNGE completed\r\n",
        )
        self.assertEqual(
            conn.send(b"f FETCH 1:* UID\r\n"),
            b"* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 4)\r\nf OK FETCH completed\r\n",
        )

    def test_many_expunges_at_once(self) -> None:
        """More than a few removals take the other path through `delete_positions`: the sequence
        numbers must come out the same."""
        self.fill(95)  # 100 messages; UIDs 2, 3, 5 and every one from 10 on that is even go
        for index in range(9, 100, 2):
            self.inbox.messages[index] = dataclasses.replace(
                self.inbox.messages[index], flags=frozenset({"\\Deleted"})
            )
        gone = [2, 3, 5, *range(10, 101, 2)]
        expected = [uid - removed for removed, uid in enumerate(gone)]
        conn = self.selected()
        self.assertEqual(
            conn.lines(b"x EXPUNGE\r\n"),
            [b"* %d EXPUNGE" % seq for seq in expected] + [b"x OK EXPUNGE completed"],
        )
        kept = [uid for uid in range(1, 101) if uid not in gone]
        self.assertEqual(
            conn.send(b"s UID SEARCH ALL\r\n"),
            b"* SEARCH %b\r\ns OK SEARCH completed\r\n" % " ".join(map(str, kept)).encode(),
        )
        self.assertEqual(
            conn.send(b"f FETCH %d UID\r\n" % len(kept)),
            b"* %d FETCH (UID 99)\r\nf OK FETCH completed\r\n" % len(kept),
        )

    def test_uid_expunge(self) -> None:
        conn = self.selected()
        self.assertEqual(conn.send(b"x UID EXPUNGE 3:4\r\n"), b"* 3 EXPUNGE\r\nx OK EXPUNGE completed\r\n")
        self.assertEqual(self.account.calls[-1], ("expunge", [3, 4]))

    def test_other_sessions_hear_of_it(self) -> None:
        """I10: another session learns of the expunge at its next NOOP, not during FETCH/STORE/SEARCH."""
        conn = self.selected()
        other = self.selected()
        conn.send(b"x EXPUNGE\r\n")
        self.assertEqual(other.send(b"f FETCH 5 UID\r\n"), b"* 5 FETCH (UID 5)\r\nf OK FETCH completed\r\n")
        self.assertEqual(other.send(b"s SEARCH ALL\r\n"), b"* SEARCH 1 2 3 4 5\r\ns OK SEARCH completed\r\n")
        self.assertEqual(
            other.send(b"n NOOP\r\n"), b"* 2 EXPUNGE\r\n* 2 EXPUNGE\r\n* 3 EXPUNGE\r\nn OK NOOP completed\r\n"
        )
        self.assertEqual(self.account.views[1].refreshes, 1)

    def test_new_messages_are_announced(self) -> None:
        conn = self.selected()
        self.inbox.add(mail("new"))
        self.assertEqual(conn.send(b"n NOOP\r\n"), b"* 6 EXISTS\r\nn OK NOOP completed\r\n")
        self.assertEqual(conn.send(b"n NOOP\r\n"), b"n OK NOOP completed\r\n")

    def test_expunge_and_new_at_once(self) -> None:
        conn = self.selected()
        other = self.selected()
        other.send(b"x EXPUNGE\r\n")
        self.inbox.add(mail("new"))
        self.assertEqual(
            conn.send(b"c CHECK\r\n"),
            b"* 2 EXPUNGE\r\n* 2 EXPUNGE\r\n* 3 EXPUNGE\r\n* 3 EXISTS\r\nc OK CHECK completed\r\n",
        )


class CopyMoveTests(IMAPTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.fill(3)

    def test_copy(self) -> None:
        conn = self.selected()
        self.assertEqual(conn.send(b"c COPY 1:2 Trash\r\n"), b"c OK [COPYUID 9 1:2 1:2] COPY completed\r\n")
        self.assertEqual(conn.send(b"c UID COPY 3 Trash\r\n"), b"c OK [COPYUID 9 3 3] COPY completed\r\n")
        self.assertEqual(conn.send(b"c UID COPY 7 Trash\r\n"), b"c OK COPY completed\r\n")
        self.assertEqual(len(self.inbox.messages), 3)

    def test_copy_trycreate(self) -> None:
        """I3: NO [TRYCREATE], not BAD."""
        conn = self.selected()
        self.assertEqual(conn.send(b"c COPY 1 Nope\r\n"), b"c NO [TRYCREATE] no such mailbox\r\n")

    def test_copy_is_one_store_operation(self) -> None:
        """I9: the whole set goes to the store at once, so a failure copies nothing."""
        self.account.copy_fails = True
        conn = self.selected()
        self.assertEqual(conn.send(b"c COPY 1:3 Trash\r\n"), b"c NO [OVERQUOTA] not enough disk space\r\n")
        self.assertEqual(self.account.calls, [("copy", [1, 2, 3], "Trash")])
        self.assertEqual(self.account.folders["Trash"].messages, [])

    def test_move(self) -> None:
        """RFC 6851: COPYUID untagged, then the EXPUNGEs, then OK."""
        conn = self.selected()
        self.assertEqual(
            conn.send(b"m MOVE 2:3 Trash\r\n"),
            b"* OK [COPYUID 9 2:3 1:2] Moved\r\n* 2 EXPUNGE\r\n* 2 EXPUNGE\r\nm OK MOVE completed\r\n",
        )
        self.assertEqual([m.uid for m in self.inbox.messages], [1])
        self.assertEqual(
            conn.send(b"m UID MOVE 1 Sent\r\n"),
            b"* OK [COPYUID 8 1 1] Moved\r\n* 1 EXPUNGE\r\nm OK MOVE completed\r\n",
        )

    def test_move_read_only(self) -> None:
        conn = self.login()
        conn.send(b"e EXAMINE INBOX\r\n")
        self.assertEqual(conn.send(b"m MOVE 1 Trash\r\n"), b"m NO Mailbox is read-only\r\n")
        self.assertEqual(self.account.calls, [])


class IdleTests(IMAPTestCase):
    def test_idle(self) -> None:
        """Changes are announced as they happen; only DONE ends IDLE."""
        self.fill(1)
        conn = self.selected()
        self.assertEqual(conn.send(b"i IDLE\r\n"), b"+ idling\r\n")
        self.inbox.add(mail("new"))
        self.assertEqual(conn.take(), b"* 2 EXISTS\r\n")
        self.assertEqual(conn.send(b"n NOOP\r\n"), b"* BAD Expected DONE\r\n")
        other = self.selected()
        other.send(b"s STORE 1 +FLAGS.SILENT (\\Deleted)\r\nx EXPUNGE\r\n")
        self.assertEqual(conn.take(), b"* 1 FETCH (UID 1 FLAGS (\\Deleted))\r\n* 1 EXPUNGE\r\n")
        self.assertEqual(conn.send(b"done\r\n"), b"i OK IDLE terminated\r\n")
        self.assertEqual(conn.send(b"n NOOP\r\n"), b"n OK NOOP completed\r\n")

    def test_idle_timeout(self) -> None:
        conn = self.login()
        conn.send(b"i IDLE\r\n")
        self.clock.advance(599)
        self.assertFalse(conn.closed)
        self.clock.advance(1)
        self.assertEqual(conn.take(), b"* BYE Autologout; idle for too long\r\n")
        self.assertTrue(conn.closed)

    def test_idle_without_folder(self) -> None:
        conn = self.login()
        self.assertEqual(conn.send(b"i IDLE\r\nDONE\r\n"), b"+ idling\r\ni OK IDLE terminated\r\n")


# --- long responses ------------------------------------------------------------------------------


class BulkTests(IMAPTestCase):
    def stepping_factory(self) -> tuple[IMAPFactory, list[Callable[[], None]]]:
        """A cooperator that runs one step per tick, with ticks the test runs itself."""
        ticks: list[Callable[[], None]] = []
        factory = self.make_factory()
        factory.cooperator = Cooperator(
            terminationPredicateFactory=lambda: lambda: True,
            scheduler=ticks.append,  # type: ignore[arg-type]  # the test runs the ticks itself
        )
        return factory, ticks

    def test_long_fetch_takes_turns(self) -> None:
        """A whole-mailbox FETCH runs in batches; other sessions are served in between."""
        self.fill(1200)
        factory, ticks = self.stepping_factory()
        conn = self.selected(factory=factory)
        other = self.login(factory=factory)
        self.assertEqual(conn.send(b"f FETCH 1:* (UID FLAGS)\r\n"), b"")
        ticks.pop(0)()
        first = conn.take()
        self.assertEqual(first.count(b"(UID "), 500)
        self.assertEqual(other.send(b"n NOOP\r\n"), b"n OK NOOP completed\r\n")
        self.assertEqual(conn.send(b"n NOOP\r\n"), b"")  # queued behind the FETCH
        while ticks:
            ticks.pop(0)()
        rest = conn.take()
        self.assertEqual(rest.count(b"(UID "), 700)
        self.assertTrue(
            rest.endswith(
                b"* 1200 FETCH (UID 1200 FLAGS ())\r\nf OK FETCH completed\r\nn OK NOOP completed\r\n"
            )
        )

    def test_backpressure(self) -> None:
        """While the transport's buffer is full the FETCH waits, and the client's clock runs."""
        self.fill(1200)
        factory, ticks = self.stepping_factory()
        conn = self.selected(factory=factory)
        conn.send(b"f FETCH 1:* (UID FLAGS)\r\n")
        self.assertIs(conn.transport.producer, conn.protocol)
        ticks.pop(0)()
        conn.protocol.pauseProducing()
        while ticks:
            ticks.pop(0)()
        self.assertEqual(conn.take().count(b" FETCH "), 500)
        conn.protocol.resumeProducing()
        while ticks:
            ticks.pop(0)()
        self.assertTrue(conn.take().endswith(b"f OK FETCH completed\r\n"))
        self.assertIs(conn.transport.producer, conn.protocol)  # the connection's, for good

    def test_store_holds_its_answers_for_a_client_that_does_not_read(self) -> None:
        """Changes the store reports while renaming are not written into a full buffer: they are
        answered with the rest once the client reads again."""
        self.fill(3)
        factory, ticks = self.stepping_factory()
        conn = self.selected(factory=factory)
        conn.protocol.pauseProducing()
        self.assertEqual(conn.send(b"s STORE 1:* +FLAGS (\\Seen)\r\n"), b"")
        while ticks:
            ticks.pop(0)()
        self.assertEqual(conn.take(), b"")
        conn.protocol.resumeProducing()
        while ticks:
            ticks.pop(0)()
        answer = conn.take()
        self.assertEqual(answer.count(b"FETCH (FLAGS (\\Seen))"), 3)
        self.assertTrue(answer.endswith(b"s OK STORE completed\r\n"))

    def test_commands_wait_for_a_client_that_does_not_read(self) -> None:
        """Commands from a client whose responses fill the buffer wait, and reading pauses once
        they pass BACKLOG_LIMIT: what the server holds stays bounded."""
        conn = self.selected()
        conn.protocol.pauseProducing()  # the transport's buffer is full
        count = BACKLOG_LIMIT // len(b"n NOOP\r\n") + 1
        self.assertEqual(conn.send(b"n NOOP\r\n" * count), b"")
        self.assertEqual(conn.transport.producerState, "paused")
        conn.protocol.resumeProducing()
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertEqual(conn.take(), b"n OK NOOP completed\r\n" * count)

    def test_client_that_stops_reading_is_dropped(self) -> None:
        self.fill(600)
        factory, ticks = self.stepping_factory()
        conn = self.selected(factory=factory)
        conn.send(b"f FETCH 1:* (UID FLAGS)\r\n")
        ticks.pop(0)()
        conn.protocol.pauseProducing()
        self.clock.advance(1800)
        self.assertTrue(conn.transport.aborted)

    def test_bodies_are_read_a_batch_at_a_time(self) -> None:
        """One store read per batch, cut where the batch's wire sizes reach BODY_BYTES."""
        for _ in range(40):
            self.inbox.add(mail("same size"))
        self.patch(imap_server, "BODY_BYTES", 16 * self.inbox.messages[0].size)
        self.account.hold_reads = True
        conn = self.selected()
        conn.send(b"f FETCH 1:* BODY.PEEK[TEXT]\r\n")
        self.assertEqual([sorted(bodies) for _, bodies in self.account.held_reads], [list(range(1, 17))])
        self.account.release_reads()
        self.clock.advance(0)
        self.assertEqual(conn.take().count(b" FETCH "), 16)
        self.assertEqual([len(bodies) for _, bodies in self.account.held_reads], [16])
        self.account.release_reads()
        self.clock.advance(0)
        self.assertEqual([len(bodies) for _, bodies in self.account.held_reads], [8])
        self.account.release_reads()
        self.clock.advance(0)
        self.assertTrue(
            conn.take().endswith(
                b"* 40 FETCH (BODY[TEXT] {12}\r\nHello Bob.\r\n)\r\nf OK FETCH completed\r\n"
            )
        )

    def test_disconnect_mid_fetch(self) -> None:
        self.fill(1200)
        factory, ticks = self.stepping_factory()
        conn = self.selected(factory=factory)
        conn.send(b"f FETCH 1:* (UID FLAGS)\r\n")
        ticks.pop(0)()
        conn.protocol.connectionLost()
        while ticks:
            ticks.pop(0)()
        self.assertTrue(self.account.views[0].closed)


class LiteralTests(IMAPTestCase):
    def test_partial_commands_are_acked_at_once(self) -> None:
        """A literal's bytes are ACKed at once (TCP_QUICKACK), so a Nagle client's CRLF after it
        isn't held 40 ms for a delayed ACK (performance notes: the APPEND literal stall)."""
        if not hasattr(socket, "TCP_QUICKACK"):
            raise self.skipTest("no TCP_QUICKACK on this platform")
        conn = self.login()
        quick_ack = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        options = conn.transport.socket.options
        conn.send(b"n NOOP\r\np APPEND Sent {3}\r\n")
        self.assertEqual(options, [quick_ack])
        conn.send(b"abc")
        self.assertEqual(options, [quick_ack, quick_ack])
        conn.send(b"\r\nn NOOP\r\n")
        self.assertEqual(options, [quick_ack, quick_ack])

    def test_literal_too_big_elsewhere(self) -> None:
        conn = self.login()
        self.assertEqual(conn.send(b"l LOGIN {2000}\r\n"), b"l BAD [TOOBIG] Literal too large\r\n")

    def test_line_too_long(self) -> None:
        conn = self.login()
        self.assertEqual(
            conn.send(b"l NOOP " + b"x" * 5000 + b"\r\nn NOOP\r\n"),
            b"l BAD Command line too long\r\nn OK NOOP completed\r\n",
        )
        self.assertFalse(conn.closed)

    def test_backlog_pauses_reading(self) -> None:
        self.hold_logins = True
        conn = self.connect()
        conn.send(b"a LOGIN alice secret\r\n" + b"n NOOP\r\n" * 10000)
        self.assertEqual(conn.transport.producerState, "paused")
        self.release_logins()
        self.assertEqual(conn.transport.producerState, "producing")


# --- hostile input -------------------------------------------------------------------------------

_VERBS = [
    b"NOOP",
    b"CAPABILITY",
    b"FETCH",
    b"UID FETCH",
    b"STORE",
    b"UID STORE",
    b"SEARCH",
    b"UID SEARCH",
    b"COPY",
    b"UID COPY",
    b"MOVE",
    b"UID MOVE",
    b"EXPUNGE",
    b"UID EXPUNGE",
    b"LIST",
    b"LSUB",
    b"STATUS",
    b"SELECT",
    b"EXAMINE",
    b"CREATE",
    b"DELETE",
    b"RENAME",
    b"SUBSCRIBE",
    b"APPEND",
    b"IDLE",
    b"CHECK",
    b"CLOSE",
    b"UNSELECT",
    b"ID",
    b"ENABLE",
    b"NAMESPACE",
    b"AUTHENTICATE",
    b"LOGIN",
    b"STARTTLS",
]
_ARGS = [
    b"1",
    b"2:*",
    b"*",
    b"1,3:2",
    b"0",
    b"4294967296",
    b"(FLAGS UID)",
    b"BODY[]<0.5>",
    b"BODY.PEEK[1.MIME]",
    b"(BODY[HEADER.FIELDS (FROM)])",
    b"ENVELOPE",
    b"+FLAGS",
    b"-FLAGS.SILENT",
    b"(\\Seen $x)",
    b"\\Deleted",
    b"INBOX",
    b"Trash",
    b"&AOk-t&AOk-",
    b"&AOk",
    b'""',
    b'"a b"',
    b"%",
    b"*",
    b"(",
    b")",
    b"{3}\r\nabc",
    b"{2+}\r\nab",
    b"{0}\r\n",
    b"NIL",
    b"CHARSET",
    b"UTF-8",
    b"OR",
    b"NOT",
    b"FROM",
    b"BODY",
    b"x",
    b"(MESSAGES UNSEEN)",
    b'"01-Feb-2022 10:00:00 +0000"',
    b"PLAIN",
    b"=",
    b"DONE",
    b"\x00",
    b"\xff\xfe",
]


class HostileInputTests(IMAPTestCase):
    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.sampled_from(_VERBS), st.lists(st.sampled_from(_ARGS), max_size=5)).map(
                    lambda c: b"t " + b" ".join([c[0], *c[1]]) + b"\r\n"
                ),
                st.binary(max_size=40),
            ),
            max_size=25,
        )
    )
    def test_never_an_internal_error(self, pieces: list[bytes]) -> None:
        """Whatever a logged-in client sends, every problem is a BAD or NO, never a server bug."""
        self.logs.errors.clear()
        self.account = FakeAccount("alice@example.test")
        self.inbox = self.account.folders["INBOX"]
        self.fill(3)
        conn = self.selected(factory=self.make_factory(max_errors=10**6))
        for piece in pieces:
            conn.send(piece)
        conn.send(b"\r\nDONE\r\n")
        self.assertEqual(self.logs.errors, [])
        self.assertFalse(conn.closed and b"Internal error" in conn.transport.value())
