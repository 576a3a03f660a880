# -*- test-case-name: tests.test_imap_server -*-
"""Our IMAP4rev1 server protocol (RFC 3501) with the extensions modern clients expect.

Twisted's IMAP4Server is not used (audit §3: bugs I1–I10 and per-message scheduling that takes
seconds over a large mailbox).  Like `kms.smtp.server`, this is a plain `Protocol` doing its own
buffering:

* One command at a time.  `CommandReader` assembles commands (literals included) in bounded
  memory; while a command waits for the store or the login session, further input is only
  buffered, and the transport paused once the backlog passes `BACKLOG_LIMIT`.
* Sequence numbers are this session's: the view's snapshot (`FolderView.messages`, in UID
  order) is what the client has been told, and changes only in `_sync`, which runs after every
  command in the selected state except FETCH, STORE and SEARCH (RFC 3501 §7.4.1) and whenever
  the folder changes during IDLE.
* Whole-mailbox FETCH, STORE and SEARCH run as cooperative tasks shared by every session of the
  factory: each step renders hundreds of messages from the in-memory index into one buffer,
  message files are read a batch at a time in the store's threads, and a transport whose
  buffer is full pauses the task (IPushProducer), so a client that does not read costs nothing.
* Bytes pipelined after STARTTLS are thrown away (I6); every SASL input gets a reply.

Which replies count toward ``max_errors``: every BAD and every failed login.
"""

from __future__ import annotations

import socket
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from operator import attrgetter
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import CooperativeTask, Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kms import __version__
from kms.auth.errors import (
    AuthenticationFailed,
    EncryptionRequired,
    MalformedResponse,
    MechanismUnavailable,
    TemporaryAuthFailure,
)
from kms.auth.policy import Decision, SecurityPolicy, may_authenticate, may_use_command
from kms.auth.sasl import Authenticated, Challenge, decode_response, encode_challenge
from kms.clientinfo import ClientInfo
from kms.imap import mutf7
from kms.imap.fetch import FetchPlan, flags_response, flags_responses, quote
from kms.imap.parser import (
    MAX_LINE,
    MAX_LITERAL,
    SEARCH_CHARSETS,
    Arguments,
    Atom,
    BadCharset,
    BodyFetch,
    Command,
    CommandReader,
    Continue,
    Line,
    ParseError,
    Rejected,
    astring_value,
    format_set,
    list_matcher,
    mailbox_name,
    parse_date_time,
    parse_fetch_items,
    parse_flag_list,
    parse_sequence_set,
    parse_store,
    resolve_set,
    search_tokens,
    split_command,
    tag_of,
    tokenize,
)
from kms.imap.search import Program, SearchContext, matches, needs_body, needs_details, parse_search
from kms.limits import REFUSAL_TEXT, Verdict
from kms.net import set_tcp_nodelay, tcp_transport, write_now
from kms.store.interfaces import (
    SYSTEM_FLAGS,
    Account,
    FolderListing,
    FolderStatus,
    FolderView,
    MailboxError,
    MessageInfo,
)

# Pending input beyond this while a command waits: stop reading from the socket.
BACKLOG_LIMIT = 64 * 1024
# Messages rendered per cooperative step: from the index alone, and with their files read (SEARCH).
META_BATCH = 500
BODY_BATCH = 16
# FETCH reads the files of up to this many bytes (wire sizes; at least one message) in one store job
# and sends their responses before reading more, so the client reads a batch while the next is read
# (100 bodies of 4 KB: 3.7-3.9 ms with 1 MiB batches, 2.4-2.6 ms with these; same server CPU).
BODY_BYTES = 64 << 10

NOT_AUTHENTICATED, AUTHENTICATED, SELECTED = "not-authenticated", "authenticated", "selected"
_ANY = frozenset({NOT_AUTHENTICATED, AUTHENTICATED, SELECTED})
_AUTH = frozenset({AUTHENTICATED, SELECTED})
_SELECTED = frozenset({SELECTED})
# Commands during which EXPUNGE must not be announced (RFC 3501 §7.4.1).
_NO_SYNC = frozenset({"FETCH", "STORE", "SEARCH"})
_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "APPENDLIMIT")
_CAPABILITIES = (
    "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE IDLE NAMESPACE UNSELECT UIDPLUS MOVE CHILDREN SPECIAL-USE"
)

_log = Logger()
_uid_of = attrgetter("uid")

Result = tuple[str, str, str]  # status ("OK", "NO", "BAD"), response code, text
Reply = Result | Deferred[Result]
_OK: Result = ("OK", "", "Completed")
_IMPLIED_PARENT = frozenset({"\\Noselect", "\\HasChildren"})


def list_selection(
    folders: Sequence[FolderListing], matches: Callable[[str], bool], lsub_wide: Callable[[str], bool] | None
) -> list[FolderListing]:
    """What LIST (``lsub_wide`` None) or LSUB answers, INBOX first, then in name order.

    LIST: the folders that exist, and each level above one that is no folder of its own, as
    ``\\Noselect``.  LSUB: the subscribed names, and an unsubscribed level above one only where a
    ``%`` stopped at that level and so hid the name below it (RFC 3501 §6.3.9), which is when
    the name matches ``lsub_wide`` (the pattern with ``%`` as ``*``) but not the pattern itself.
    """
    if lsub_wide is None:
        entries = {f.name: f for f in folders if "\\NonExistent" not in f.attributes}
    else:
        entries = {f.name: f for f in folders if f.subscribed}
    implied: dict[str, FolderListing] = {}
    for name in entries:
        if lsub_wide is not None and (matches(name) or not lsub_wide(name)):
            continue
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in entries:
                implied[parent] = FolderListing(parent, _IMPLIED_PARENT, False)
    entries.update(implied)
    return [entries[name] for name in sorted(entries, key=lambda n: (n != "INBOX", n)) if matches(name)]


def _keywords(flags: Iterable[str]) -> set[str]:
    """The keywords among ``flags`` (the store keeps system flags in canonical spelling)."""
    return {flag for flag in flags if not flag.startswith("\\")}


@dataclass(frozen=True)
class IMAPSettings:
    """What one listener's IMAP service looks like; built once from the config."""

    hostname: str
    listener: str  # "imap" or "imaps"
    implicit_tls: bool
    hide_version: bool
    append_limit: int  # APPENDLIMIT: the largest message APPEND accepts
    command_timeout: float = 1800  # RFC 3501 §5.4: the autologout timer is at least 30 minutes
    idle_timeout: float = 1800
    max_errors: int = 10
    max_line: int = MAX_LINE
    max_literal: int = MAX_LITERAL
    policy: SecurityPolicy = field(default_factory=SecurityPolicy)  # [security] policy (SPEC §5)


class SASLExchange(TypingProtocol):
    def step(self, response: bytes | None) -> Deferred[Challenge | Authenticated]: ...


class LoginSession(TypingProtocol):
    """The per-connection login session (`kms.auth.session.LoginSession`)."""

    def mechanisms(self) -> list[str]: ...

    def begin(self, name: str) -> SASLExchange: ...

    def login_plaintext(self, username: str, password: str, method: str) -> Deferred[Authenticated]: ...

    def master_challenge(self) -> str | None: ...

    def master_answer(self, answer: str) -> Deferred[None]: ...

    def logout(self) -> None: ...


class IMAPLogs(TypingProtocol):
    """The part of `kms.logs.Logs` this protocol writes to."""

    def debug(
        self, category: str, event: str, client: ClientInfo | None = None, **fields: object
    ) -> None: ...

    def error(self, event: str, client: ClientInfo | None = None, **fields: object) -> None: ...

    def security(self, event: str, client: ClientInfo | None = None, **fields: object) -> None: ...


def _sanitize(text: str) -> str:
    """Response text may quote the store or the client: no line breaks or controls (and it goes
    out as ASCII: resp-text is 7-bit, RFC 3501 §9)."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else " " for char in text)


def _body_batches(messages: Sequence[MessageInfo], indices: Iterable[int]) -> Iterator[list[int]]:
    """Positions in groups read by one thread-pool job each: a hop per message cost more than the
    read; a bound on bytes keeps a FETCH of large messages from holding many of them at once."""
    batch: list[int] = []
    size = 0
    for index in indices:
        batch.append(index)
        size += messages[index].size
        if size >= BODY_BYTES or len(batch) == META_BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _quick_ack(transport: object) -> None:
    """ACK what has arrived of a command at once.

    A client with Nagle on (imaplib) sends a literal and then the CRLF that ends the command as two
    segments; the CRLF waits for the ACK of the literal, which the kernel delays up to 40 ms
    hoping to send it with a reply that cannot come before the CRLF (performance notes, "the
    APPEND literal stall").  Setting TCP_QUICKACK sends the pending ACK now.
    """
    option = getattr(socket, "TCP_QUICKACK", None)
    tcp = tcp_transport(transport)
    if option is None or tcp is None:
        return
    try:
        tcp.getHandle().setsockopt(socket.IPPROTO_TCP, option, 1)  # type: ignore[attr-defined]
    except (OSError, AttributeError):  # not a socket (UNIX, test doubles), or already closed
        pass


@implementer(IPushProducer)
class IMAPServer(Protocol):
    """One IMAP connection: bytes in, calls on the login session and the store out, responses back.

    Input modes: ``_line_consumer`` set means raw lines (IDLE's DONE, SASL responses) go to it;
    otherwise commands are read whenever no command is in progress (``_waiting``).
    """

    client: ClientInfo
    _session: LoginSession

    def __init__(
        self,
        settings: IMAPSettings,
        accounts: Callable[[str], Deferred[Account]],
        session_factory: Callable[[ClientInfo], LoginSession],
        tls_context: object | None,
        clock: IReactorTime,
        cooperator: Cooperator,
        logs: IMAPLogs | None = None,
    ) -> None:
        self.settings = settings
        self._accounts = accounts
        self._session_factory = session_factory
        self._tls_context = tls_context
        self._clock = clock
        self._cooperator = cooperator
        self._logs = logs
        self._reader = CommandReader(settings.max_line, settings.max_literal, settings.append_limit)
        self._state = NOT_AUTHENTICATED
        self._account: Account | None = None
        self._view: FolderView | None = None
        self._keywords: set[str] = set()  # the keywords this client's FLAGS listed
        self._line_consumer: Callable[[Line], None] | None = None
        self._idle: Deferred[Result] | None = None
        self._after: Callable[[], None] | None = None  # runs once the tagged response is queued
        self._task: CooperativeTask[Any] | None = None
        self._waiting = False
        self._pumping = False
        self._paused = False  # we paused reading
        self._output_paused = False  # the transport paused our writing
        self._closing = False
        self._gone = False
        self._out: list[bytes] = []
        self._errors = 0
        self._timer: IDelayedCall | None = None
        self._commands: dict[str, tuple[Callable[[Arguments], Reply], frozenset[str]]] = {
            "CAPABILITY": (self._do_CAPABILITY, _ANY),
            "NOOP": (self._do_NOOP, _ANY),
            "LOGOUT": (self._do_LOGOUT, _ANY),
            "ID": (self._do_ID, _ANY),
            "STARTTLS": (self._do_STARTTLS, frozenset({NOT_AUTHENTICATED})),
            "LOGIN": (self._do_LOGIN, frozenset({NOT_AUTHENTICATED})),
            "AUTHENTICATE": (self._do_AUTHENTICATE, frozenset({NOT_AUTHENTICATED})),
            "X-MASTERAUTH": (self._do_X_MASTERAUTH, frozenset({NOT_AUTHENTICATED})),
            "ENABLE": (self._do_ENABLE, frozenset({AUTHENTICATED})),
            "NAMESPACE": (self._do_NAMESPACE, _AUTH),
            "SELECT": (lambda args: self._select(args, readonly=False), _AUTH),
            "EXAMINE": (lambda args: self._select(args, readonly=True), _AUTH),
            "CREATE": (self._do_CREATE, _AUTH),
            "DELETE": (self._do_DELETE, _AUTH),
            "RENAME": (self._do_RENAME, _AUTH),
            "SUBSCRIBE": (lambda args: self._subscribe(args, True), _AUTH),
            "UNSUBSCRIBE": (lambda args: self._subscribe(args, False), _AUTH),
            "LIST": (lambda args: self._list(args, lsub=False), _AUTH),
            "LSUB": (lambda args: self._list(args, lsub=True), _AUTH),
            "STATUS": (self._do_STATUS, _AUTH),
            "APPEND": (self._do_APPEND, _AUTH),
            "IDLE": (self._do_IDLE, _AUTH),
            "CHECK": (self._do_CHECK, _SELECTED),
            "CLOSE": (self._do_CLOSE, _SELECTED),
            "UNSELECT": (self._do_UNSELECT, _SELECTED),
            "EXPUNGE": (self._do_EXPUNGE, _SELECTED),
            "UID EXPUNGE": (self._do_UID_EXPUNGE, _SELECTED),
            "FETCH": (lambda args: self._fetch(args, uid=False), _SELECTED),
            "UID FETCH": (lambda args: self._fetch(args, uid=True), _SELECTED),
            "STORE": (lambda args: self._store(args, uid=False), _SELECTED),
            "UID STORE": (lambda args: self._store(args, uid=True), _SELECTED),
            "SEARCH": (lambda args: self._search(args, uid=False), _SELECTED),
            "UID SEARCH": (lambda args: self._search(args, uid=True), _SELECTED),
            "COPY": (lambda args: self._copy(args, uid=False, move=False), _SELECTED),
            "UID COPY": (lambda args: self._copy(args, uid=True, move=False), _SELECTED),
            "MOVE": (lambda args: self._copy(args, uid=False, move=True), _SELECTED),
            "UID MOVE": (lambda args: self._copy(args, uid=True, move=True), _SELECTED),
        }

    # --- Twisted's side ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        settings = self.settings
        self.client = ClientInfo.from_transport(self.transport, settings.listener, settings.implicit_tls)
        self._session = self._session_factory(self.client)
        set_tcp_nodelay(self.transport)
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._debug("connect")
        product = "" if settings.hide_version else f" kms {__version__}"
        self._untagged(f"OK [CAPABILITY {self._capabilities()}] {settings.hostname}{product} IMAP4rev1 ready")
        self._arm_timer()
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        self._pump(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = self._closing = True
        self._arm_timer()
        self._reader.clear()
        task, self._task = self._task, None
        if task is not None:
            task.stop()
        self._close_view()
        self._session.logout()
        self._debug("disconnect", errors=self._errors)

    # IPushProducer, for the whole connection: the transport's write buffer is full (or drained
    # again).  While it is full a long response's task waits and no further command runs, so a
    # client that does not read its responses cannot make us hold more than the buffer.

    def pauseProducing(self) -> None:
        if not self._output_paused:
            self._output_paused = True
            if self._task is not None:
                self._task.pause()
            self._arm_timer()

    def resumeProducing(self) -> None:
        if self._output_paused:
            self._output_paused = False
            if self._task is not None:
                self._task.resume()
            self._arm_timer()
            self._pump()

    def stopProducing(self) -> None:
        """The connection is going away; `connectionLost` cleans up."""

    # --- input ------------------------------------------------------------------------------------

    def _pump(self, data: bytes = b"") -> None:
        """Process input until it runs out, a command waits, or the connection closes; then write."""
        if not self._closing:
            self._reader.feed(data)
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._closing and not self._output_paused:
                if self._line_consumer is not None:
                    line = self._reader.next_line()
                    if line is None:
                        break
                    self._line_consumer(line)
                elif self._waiting:
                    break
                else:
                    event = self._reader.next_command()
                    if event is None:
                        break
                    self._event(event)
        except Exception:
            # Somewhere between states: nothing sensible can follow.
            self._internal_error("imap-internal-error", Failure())
            self._shutdown("Internal error")
        finally:
            self._pumping = False
        if self._reader.inside_command and not self._gone:
            _quick_ack(self.transport)
        self._backpressure()
        self._arm_timer()
        self._flush()

    def _event(self, event: Command | Continue | Rejected) -> None:
        if isinstance(event, Continue):
            self._out.append(b"+ Ready for literal data\r\n")
            self._flush()
        elif isinstance(event, Rejected):
            self._tagged(event.tag, event.status, event.code, event.text)
        else:
            self._dispatch(event)

    def _backpressure(self) -> None:
        """Pause reading while a large backlog waits behind a command or a client that does not read."""
        held = (self._waiting and self._line_consumer is None) or self._output_paused
        want_pause = held and self._reader.buffered > BACKLOG_LIMIT
        if self._gone or want_pause == self._paused:
            return
        self._paused = want_pause
        if want_pause:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        else:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    # --- output -----------------------------------------------------------------------------------

    def _untagged(self, text: str) -> None:
        self._out.append(b"* " + text.encode("utf-8") + b"\r\n")

    def _tagged(self, tag: str, status: str, code: str, text: str) -> None:
        if self._closing:
            return
        code_text = f"[{code}] " if code else ""
        self._out.append(f"{tag} {status} {code_text}{_sanitize(text)}\r\n".encode("ascii", "replace"))
        if status == "BAD" or code == "AUTHENTICATIONFAILED":
            self._count_error()

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors > self.settings.max_errors:
            self._debug("too-many-errors", errors=self._errors)
            self._shutdown("Too many errors")

    def _shutdown(self, text: str) -> None:
        """Queue a last ``* BYE``; the connection closes once it is written."""
        if not self._closing:
            self._untagged(f"BYE {text}")
            self._closing = True

    def _flush(self) -> None:
        if self._gone:
            return
        if self._out:
            data, self._out = b"".join(self._out), []
            write_now(self.transport, data)
        if self._closing:
            self._gone = True
            # A registered producer would hold the close back until it unregisters (Twisted).
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]

    # --- running commands -------------------------------------------------------------------------

    def _dispatch(self, command: Command) -> None:
        try:
            tag, name, arguments = split_command(tokenize(command))
        except ParseError as e:
            self._tagged(tag_of(command.texts[0]), "BAD", "", str(e))
            return
        entry = self._commands.get(name)
        if entry is None:
            self._tagged(tag, "BAD", "", f"Unknown command {name[:24]}")
            return
        if not may_use_command(self.settings.policy, self.client, "imap", name):
            # NO, not BAD: the command is fine, the connection is not (RFC 5530 PRIVACYREQUIRED).
            self._security("command-refused", command=name, reason="security policy requires TLS")
            self._tagged(tag, "NO", "PRIVACYREQUIRED", "Encryption required by security policy")
            return
        handler, states = entry
        if self._state not in states:
            text = "not authenticated" if self._state == NOT_AUTHENTICATED else "not valid in this state"
            self._tagged(tag, "BAD", "", f"{name}: {text}")
            return
        self._debug("command", tag=tag, command=name)
        try:
            reply = handler(Arguments(arguments))
        except Exception:
            self._finish(Failure(), tag, name)
            return
        if isinstance(reply, Deferred):
            self._waiting = True
            reply.addBoth(self._completed, tag, name)
        else:
            self._finish(reply, tag, name)

    def _completed(self, result: Result | Failure, tag: str, name: str) -> None:
        self._waiting = False
        try:
            self._finish(result, tag, name)
        except Exception:
            self._internal_error("imap-internal-error", Failure())
            self._shutdown("Internal error")
        self._pump()

    def _finish(self, result: Result | Failure, tag: str, name: str) -> None:
        """The tagged response, after announcing changes where RFC 3501 §7.4.1 allows it."""
        if self._gone:
            return
        if isinstance(result, Failure):
            result = self._failure_result(result, name)
        if self._state == SELECTED and name not in _NO_SYNC:
            self._sync()
        self._tagged(tag, *result)
        after, self._after = self._after, None
        if after is not None:
            after()

    def _failure_result(self, failure: Failure, name: str) -> Result:
        if failure.check(ParseError):
            return ("BAD", "", f"{name}: {failure.getErrorMessage()}")
        if failure.check(MailboxError):
            error: MailboxError = failure.value  # type: ignore[assignment]
            return ("NO", error.code, str(error) or "Failed")
        self._internal_error("imap-internal-error", failure)
        return ("NO", "SERVERBUG", "Internal error")

    def _internal_error(self, event: str, failure: Failure) -> None:
        """A bug or a broken store: the error log gets a line, twistd's log the traceback."""
        if self._logs is not None:
            kind = type(failure.value).__name__
            self._logs.error(event, self.client, error=failure.getErrorMessage(), type=kind)
        _log.failure("IMAP {event} for {client}", failure, event=event, client=self.client.describe())

    def _bulk(self, work: Iterator[Deferred[Any] | None]) -> Deferred[Any]:
        """Run a long response as a cooperative task; it is paused while the client doesn't read."""
        task = self._task = self._cooperator.cooperate(work)
        if self._output_paused:
            task.pause()

        def done(result: object) -> object:
            self._task = None
            self._flush()
            return result

        return task.whenDone().addBoth(done)

    def _write(self, chunks: list[bytes]) -> None:
        """Bulk output: straight to the transport (which may pause us in return)."""
        self._out.extend(chunks)
        chunks.clear()
        self._flush()

    # --- timers -----------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        """The client's clock runs while it is its turn: to send, or to read what we wrote."""
        clients_turn = not self._waiting or self._line_consumer is not None or self._output_paused
        if self._closing or not clients_turn:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        timeout = self.settings.idle_timeout if self._idle is not None else self.settings.command_timeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self._clock.callLater(timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._debug("timeout", idle=self._idle is not None)
        if self._output_paused:
            # The client stopped reading: the BYE could never be delivered.
            self._gone = self._closing = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._shutdown("Autologout; idle for too long")
        self._flush()

    # --- the selected folder ----------------------------------------------------------------------

    def _sync(self) -> None:
        """Tell the client what changed: new keywords (FLAGS), EXPUNGE (sequence numbers adjusted
        as each goes), EXISTS, flag changes; the work follows the number of changes, not the
        folder's size.  The view's snapshot is the client's knowledge again afterwards."""
        view = self._view
        assert view is not None
        event = view.sync()
        self._new_keywords(flag for info in chain(event.added, event.flags) for flag in info.flags)
        messages = view.messages
        # Ascending UIDs that were in the snapshot: each one's number, counting the ones before it
        # as gone already, is where it would sit among the messages that stay.
        self._out.extend(
            b"* %d EXPUNGE\r\n" % (bisect_left(messages, uid, key=_uid_of) + 1) for uid in event.expunged
        )
        if event.added:
            self._out.append(b"* %d EXISTS\r\n" % len(messages))
        for info in event.flags:
            seq = self._seq_of(info.uid)
            if seq:
                self._out.append(flags_response(seq, info, uid=True))

    def _new_keywords(self, flags: Iterable[str]) -> None:
        """Keywords this client has not been told of yet go into FLAGS (and PERMANENTFLAGS), sent
        at once: before any FETCH that shows them (RFC 3501 §7.2.6)."""
        new = _keywords(flags) - self._keywords
        if new:
            self._keywords |= new
            self._flags_responses()

    def _flags_responses(self) -> None:
        view = self._selected_view()
        flags = " ".join([*SYSTEM_FLAGS, *sorted(self._keywords)])
        self._untagged(f"FLAGS ({flags})")
        permanent = "" if view.readonly else f"{flags} \\*"
        self._untagged(f"OK [PERMANENTFLAGS ({permanent})] Flags permitted")

    def _seqs_of(self, wanted: list[int]) -> Sequence[int]:
        """The sequence numbers of ascending ``wanted`` UIDs (0: unknown); a run of consecutive
        messages, as a STORE 1:* names, is found by one comparison instead of a search each."""
        messages = self._selected_view().messages
        if not wanted:
            return []
        start = bisect_left(messages, wanted[0], key=_uid_of)
        if list(map(_uid_of, messages[start : start + len(wanted)])) == wanted:
            return range(start + 1, start + 1 + len(wanted))
        return [self._seq_of(uid) for uid in wanted]

    def _seq_of(self, uid: int) -> int:
        """The sequence number of ``uid`` for this client, or 0."""
        messages = self._selected_view().messages
        index = bisect_left(messages, uid, key=_uid_of)
        return index + 1 if index < len(messages) and messages[index].uid == uid else 0

    def _folder_changed(self) -> None:
        """The view's listener: in IDLE, announce at once; otherwise at the next command's end."""
        if self._idle is not None and self._view is not None and not self._gone:
            self._sync()
            self._flush()

    def _close_view(self) -> None:
        view, self._view = self._view, None
        if self._state == SELECTED:
            self._state = AUTHENTICATED
        if view is not None:
            view.set_listener(None)
            view.close()

    def _message_ranges(self, text: str, uid: bool) -> list[tuple[int, int]]:
        """A sequence set as index ranges [start, stop) into the view's messages."""
        ranges = parse_sequence_set(text)
        messages = self._selected_view().messages
        if uid:
            spans = resolve_set(ranges, messages[-1].uid if messages else 0)
            found = (
                (bisect_left(messages, low, key=_uid_of), bisect_right(messages, high, key=_uid_of))
                for low, high in spans
            )
            return [(start, stop) for start, stop in found if start < stop]
        spans = resolve_set(ranges, len(messages))
        if spans and (spans[0][0] < 1 or spans[-1][1] > len(messages)):
            raise ParseError("Invalid message sequence number")
        return [(low - 1, high) for low, high in spans]

    def _selected_uids(self, ranges: Sequence[tuple[int, int]]) -> list[int]:
        messages = self._selected_view().messages
        return [messages[index].uid for index in chain.from_iterable(range(a, b) for a, b in ranges)]

    def _selected_view(self) -> FolderView:
        assert self._view is not None
        return self._view

    def _user_account(self) -> Account:
        assert self._account is not None
        return self._account

    # --- any state --------------------------------------------------------------------------------

    def _capabilities(self) -> str:
        words = [_CAPABILITIES, f"APPENDLIMIT={self.settings.append_limit}"]
        if self._state == NOT_AUTHENTICATED:
            if self._tls_context is not None and not self.client.tls:
                words.append("STARTTLS")
            mechanisms = self._session.mechanisms()
            words.extend(f"AUTH={name}" for name in mechanisms)
            if self._cleartext_needs_tls() or self._login_disabled(mechanisms):
                words.append("LOGINDISABLED")
        return " ".join(words)

    @staticmethod
    def _login_disabled(mechanisms: Sequence[str]) -> bool:
        """LOGIN sends a cleartext password: it goes with the cleartext SASL mechanisms, so the
        security policy that withholds PLAIN and LOGIN from a client withholds LOGIN too."""
        return not {"PLAIN", "LOGIN"} & set(mechanisms)

    def _cleartext_needs_tls(self) -> bool:
        """LOGIN is not SASL, so the engine's policy never sees it: ask the policy directly."""
        decision = may_authenticate(self.settings.policy, self.client, "IMAP-LOGIN", "imap")
        return decision is Decision.NEEDS_TLS

    def _do_CAPABILITY(self, args: Arguments) -> Result:
        args.end()
        self._untagged("CAPABILITY " + self._capabilities())
        return ("OK", "", "CAPABILITY completed")

    def _do_NOOP(self, args: Arguments) -> Reply:
        """In a folder, NOOP (like CHECK and IDLE) also picks up files delivered by other processes."""
        args.end()
        if self._view is None:
            return ("OK", "", "NOOP completed")
        return self._view.refresh().addCallback(lambda _: ("OK", "", "NOOP completed"))

    def _do_LOGOUT(self, args: Arguments) -> Result:
        args.end()
        self._untagged("BYE Logging out")
        self._after = self._logout
        return ("OK", "", "LOGOUT completed")

    def _logout(self) -> None:
        self._closing = True

    def _do_ID(self, args: Arguments) -> Result:
        """RFC 2971: the client's identification goes to the debug log; ours is NIL if versions are hidden."""
        token = args.next("ID parameters")
        args.end()
        if isinstance(token, list):
            if len(token) % 2 or len(token) > 60:
                raise ParseError("Invalid ID parameters")
            values = [None if v == "NIL" and isinstance(v, Atom) else astring_value(v, "ID") for v in token]
            fields = dict(zip(values[::2], values[1::2], strict=True))
            self._debug("id", client_id=_sanitize(repr(fields))[:512])
        elif not (isinstance(token, Atom) and token.upper() == "NIL"):
            raise ParseError("Invalid ID parameters")
        # SPEC §2: with hide_version no product name either; RFC 2971 lets a server answer NIL.
        ours = "NIL" if self.settings.hide_version else f'("name" "kms" "version" "{__version__}")'
        self._untagged(f"ID {ours}")
        return ("OK", "", "ID completed")

    # --- not authenticated ------------------------------------------------------------------------

    def _do_STARTTLS(self, args: Arguments) -> Result:
        args.end()
        if self.client.tls:
            raise ParseError("TLS already active")
        if self._tls_context is None:
            return ("NO", "", "TLS not available")
        self._after = self._start_tls
        return ("OK", "", "Begin TLS negotiation now")

    def _start_tls(self) -> None:
        # Anything pipelined after STARTTLS was sent in clear text: it must not be obeyed as if it
        # had arrived over TLS (CVE-2011-0411, audit I6).
        self._reader.clear()
        self._flush()
        self.transport.startTLS(self._tls_context)  # type: ignore[union-attr]
        self.client.tls = True
        self._debug("starttls")

    def _do_LOGIN(self, args: Arguments) -> Reply:
        username = args.astring("user name")
        password = args.astring("password")
        args.end()
        if self._cleartext_needs_tls():
            self._security("mechanism-refused", method="IMAP-LOGIN", reason="IMAP-LOGIN requires TLS")
            return ("NO", "PRIVACYREQUIRED", "Cleartext login is not allowed here")
        if self._login_disabled(self._session.mechanisms()):
            if not self.client.tls:
                return ("NO", "PRIVACYREQUIRED", "Cleartext login is not allowed here")
            return ("NO", "", "Cleartext login is not allowed here")
        d = self._session.login_plaintext(username, password, "IMAP-LOGIN")
        return d.addCallbacks(self._logged_in, self._login_failed)

    def _do_AUTHENTICATE(self, args: Arguments) -> Reply:
        mechanism = args.atom("mechanism")
        initial = args.astring("initial response") if args.more() else None
        args.end()
        try:
            exchange = self._session.begin(mechanism)
        except EncryptionRequired:
            return ("NO", "PRIVACYREQUIRED", "Mechanism requires TLS")
        except MechanismUnavailable:
            return ("NO", "", "Unsupported authentication mechanism")
        data = None
        if initial is not None:  # SASL-IR (RFC 4959)
            try:
                data = decode_response(initial.encode("ascii", "replace"))
            except MalformedResponse:
                raise ParseError("Invalid base64 in initial response") from None
            if data is None:
                raise ParseError("Authentication cancelled")
        done: Deferred[Result] = Deferred()
        self._auth_step(exchange, data, done)
        return done

    def _do_X_MASTERAUTH(self, args: Arguments) -> Reply:
        """Kerio's master authentication (SPEC §7): ``+ <challenge>``, hex MD5(challenge + password).

        Refused like an unknown command for clients outside ``[master] group``.
        """
        args.end()
        challenge = self._session.master_challenge()
        if challenge is None:
            return ("BAD", "", "Unknown command X-MASTERAUTH")  # as for any unknown command
        done: Deferred[Result] = Deferred()
        self._out.append(b"+ " + challenge.encode("ascii") + b"\r\n")
        self._line_consumer = lambda line: self._master_line(line, done)
        self._pump()
        return done

    def _master_line(self, line: Line, done: Deferred[Result]) -> None:
        self._line_consumer = None
        if line.too_long:
            done.callback(("BAD", "", "X-MASTERAUTH response too long"))
            return
        d = self._session.master_answer(line.data.decode("ascii", "replace"))
        d.addCallbacks(
            lambda _: done.callback(("OK", "", "X-MASTERAUTH Welcome to server, master")),
            lambda failure: done.callback(self._login_failed(failure)),
        )

    def _auth_step(self, exchange: SASLExchange, data: bytes | None, done: Deferred[Result]) -> None:
        def answered(result: Challenge | Authenticated) -> None:
            if isinstance(result, Challenge):
                self._out.append(b"+ " + encode_challenge(result.data) + b"\r\n")
                self._line_consumer = lambda line: self._auth_line(exchange, line, done)
                self._pump()  # write the challenge; a response may already be buffered
            else:
                self._logged_in(result).chainDeferred(done)

        d: Deferred[Any] = maybeDeferred(exchange.step, data)
        d.addCallbacks(answered, lambda failure: done.callback(self._login_failed(failure)))

    def _auth_line(self, exchange: SASLExchange, line: Line, done: Deferred[Result]) -> None:
        self._line_consumer = None
        if line.too_long:
            done.callback(("BAD", "", "SASL response too long"))
            return
        try:
            data = decode_response(line.data)
        except MalformedResponse:
            done.callback(("BAD", "", "Invalid base64 in SASL response"))
            return
        if data is None:
            done.callback(("BAD", "", "Authentication cancelled"))
            return
        self._auth_step(exchange, data, done)

    def _logged_in(self, result: Authenticated) -> Deferred[Result]:
        def ready(account: Account) -> Result:
            self._account = account
            self._state = AUTHENTICATED
            return ("OK", f"CAPABILITY {self._capabilities()}", "Logged in")

        def unavailable(failure: Failure) -> Result:
            self._internal_error("imap-account-error", failure)
            self._session.logout()
            return ("NO", "UNAVAILABLE", "Mailbox temporarily unavailable")

        d: Deferred[Any] = maybeDeferred(self._accounts, result.identity)
        return d.addCallbacks(ready, unavailable)

    def _login_failed(self, failure: Failure) -> Result:
        if failure.check(AuthenticationFailed):
            return ("NO", "AUTHENTICATIONFAILED", "Authentication failed")
        if failure.check(MalformedResponse):
            return ("BAD", "", "Invalid SASL response")
        # Never "wrong password" for what may be an outage or a bug.
        if not failure.check(TemporaryAuthFailure):
            self._internal_error("imap-auth-error", failure)
        return ("NO", "UNAVAILABLE", "Temporary authentication failure")

    # --- authenticated ----------------------------------------------------------------------------

    def _do_ENABLE(self, args: Arguments) -> Result:
        """RFC 5161: none of the extensions ENABLE can switch on is offered, so none is enabled."""
        tokens = args.rest()
        if not tokens or not all(isinstance(token, Atom) for token in tokens):
            raise ParseError("Invalid capability list")
        self._untagged("ENABLED")
        return ("OK", "", "ENABLE completed")

    def _do_NAMESPACE(self, args: Arguments) -> Result:
        """One personal namespace; no other users' and no shared folders (I7: NIL, not shared)."""
        args.end()
        self._untagged('NAMESPACE (("" "/")) NIL NIL')
        return ("OK", "", "NAMESPACE completed")

    def _select(self, args: Arguments, readonly: bool) -> Deferred[Result]:
        name = args.mailbox()
        args.end()
        self._close_view()  # a failed SELECT leaves no folder selected (RFC 3501 §6.3.1)
        verb = "EXAMINE" if readonly else "SELECT"

        def opened(view: FolderView) -> Result:
            if self._gone:
                view.close()
                return _OK
            self._view = view
            self._state = SELECTED
            view.sync()
            messages = view.messages
            view.set_listener(self._folder_changed)
            self._keywords = _keywords(set().union(*{info.flags for info in messages}))
            self._flags_responses()
            self._untagged(f"{len(messages)} EXISTS")
            # The \\Recent messages are the view's (`kms.store.mailbox`); `FolderView` doesn't promise them.
            self._untagged(f"{len(view.recent)} RECENT")
            unseen = next((i for i, info in enumerate(messages, 1) if "\\Seen" not in info.flags), 0)
            if unseen:
                self._untagged(f"OK [UNSEEN {unseen}] First unseen")
            self._untagged(f"OK [UIDVALIDITY {view.uidvalidity}] UIDs valid")
            self._untagged(f"OK [UIDNEXT {view.uidnext}] Predicted next UID")
            return ("OK", "READ-ONLY" if view.readonly else "READ-WRITE", f"{verb} completed")

        return self._user_account().open(name, readonly).addCallback(opened)

    def _do_CREATE(self, args: Arguments) -> Deferred[Result]:
        raw = args.astring("mailbox name")
        args.end()
        # A trailing delimiter says the client means to create children (RFC 3501 §6.3.3).
        name = mailbox_name(raw.removesuffix("/") or raw)
        return self._user_account().create(name).addCallback(lambda _: ("OK", "", "CREATE completed"))

    def _do_DELETE(self, args: Arguments) -> Deferred[Result]:
        name = args.mailbox()
        args.end()
        return self._user_account().delete(name).addCallback(lambda _: ("OK", "", "DELETE completed"))

    def _do_RENAME(self, args: Arguments) -> Deferred[Result]:
        old = args.mailbox()
        new = args.mailbox()
        args.end()
        return self._user_account().rename(old, new).addCallback(lambda _: ("OK", "", "RENAME completed"))

    def _subscribe(self, args: Arguments, subscribed: bool) -> Deferred[Result]:
        name = args.mailbox()
        args.end()
        verb = "SUBSCRIBE" if subscribed else "UNSUBSCRIBE"
        d = self._user_account().subscribe(name, subscribed)
        return d.addCallback(lambda _: ("OK", "", f"{verb} completed"))

    def _list(self, args: Arguments, lsub: bool) -> Reply:
        verb = "LSUB" if lsub else "LIST"
        if isinstance(args.peek(), list):
            raise ParseError("LIST-EXTENDED selection options are not supported")
        reference = args.astring("reference")
        pattern = args.astring("mailbox pattern")
        args.end()
        if not pattern and not lsub:
            self._untagged('LIST (\\Noselect) "/" ""')
            return ("OK", "", "LIST completed")
        matcher = list_matcher(reference, pattern)
        # The pattern with "%" as "*": the names a "%" stopped short of (LSUB's \\Noselect levels).
        wide = list_matcher(reference.replace("%", "*"), pattern.replace("%", "*"))

        def listed(folders: Sequence[FolderListing]) -> Result:
            for folder in list_selection(folders, matcher, wide if lsub else None):
                wire = b'* %b (%b) "/" %b\r\n' % (
                    verb.encode(),
                    " ".join(sorted(folder.attributes)).encode("utf-8"),
                    quote(mutf7.encode(folder.name)).encode("utf-8"),
                )
                self._out.append(wire)
            return ("OK", "", f"{verb} completed")

        return self._user_account().list().addCallback(listed)

    def _do_STATUS(self, args: Arguments) -> Deferred[Result]:
        name = args.mailbox()
        items = [token.upper() if isinstance(token, Atom) else "" for token in args.group("status items")]
        args.end()
        if not items or any(item not in _STATUS_ITEMS for item in items):
            raise ParseError("Invalid status item")

        def status(result: FolderStatus) -> Result:
            values = {
                "MESSAGES": result.messages,
                "RECENT": result.recent,
                "UIDNEXT": result.uidnext,
                "UIDVALIDITY": result.uidvalidity,
                "UNSEEN": result.unseen,
                "APPENDLIMIT": self.settings.append_limit,
            }
            text = " ".join(f"{item} {values[item]}" for item in dict.fromkeys(items))
            self._out.append(
                b"* STATUS %b (%b)\r\n" % (quote(mutf7.encode(name)).encode("utf-8"), text.encode("ascii"))
            )
            return ("OK", "", "STATUS completed")

        return self._user_account().status(name).addCallback(status)

    def _do_APPEND(self, args: Arguments) -> Deferred[Result]:
        name = args.mailbox()
        token = args.next("message literal")
        flags: list[str] = []
        date = None
        if isinstance(token, list):
            flags = parse_flag_list(token)
            token = args.next("message literal")
        if isinstance(token, str) and not isinstance(token, Atom) and args.more():
            date = parse_date_time(token)
            token = args.next("message literal")
        args.end()
        if not isinstance(token, bytes):
            raise ParseError("The message must be a literal")
        if len(token) > self.settings.append_limit:  # the reader allows any literal max_literal bytes
            return succeed(("NO", "TOOBIG", "Message too large"))

        def appended(result: tuple[int, int]) -> Result:
            return ("OK", f"APPENDUID {result[0]} {result[1]}", "APPEND completed")

        return self._user_account().append(name, token, flags, date).addCallback(appended)

    def _do_IDLE(self, args: Arguments) -> Deferred[Result]:
        """RFC 2177: changes are announced as they happen, until the client sends DONE."""
        args.end()
        self._idle = Deferred()
        self._out.append(b"+ idling\r\n")
        self._line_consumer = self._idle_line
        if self._view is not None:
            self._sync()
            self._view.refresh().addErrback(self._refresh_failed)
        return self._idle

    def _refresh_failed(self, failure: Failure) -> None:
        self._internal_error("imap-refresh-error", failure)

    def _idle_line(self, line: Line) -> None:
        if line.too_long or line.data.strip().upper() != b"DONE":
            self._untagged("BAD Expected DONE")  # only DONE ends IDLE; the client keeps idling
            self._count_error()
            return
        self._line_consumer = None
        idle, self._idle = self._idle, None
        assert idle is not None
        idle.callback(("OK", "", "IDLE terminated"))

    # --- selected ---------------------------------------------------------------------------------

    def _do_CHECK(self, args: Arguments) -> Deferred[Result]:
        args.end()
        return self._selected_view().refresh().addCallback(lambda _: ("OK", "", "CHECK completed"))

    def _do_CLOSE(self, args: Arguments) -> Reply:
        """Expunge silently (RFC 3501 §6.4.2), then leave the folder."""
        args.end()
        view = self._selected_view()
        if view.readonly:
            self._close_view()
            return ("OK", "", "CLOSE completed")

        def expunged(_: object) -> Result:
            self._close_view()
            return ("OK", "", "CLOSE completed")

        return view.expunge().addCallback(expunged)

    def _do_UNSELECT(self, args: Arguments) -> Result:
        args.end()
        self._close_view()
        return ("OK", "", "UNSELECT completed")

    def _writable_view(self) -> FolderView:
        view = self._selected_view()
        if view.readonly:
            raise MailboxError("Mailbox is read-only", "")
        return view

    def _do_EXPUNGE(self, args: Arguments) -> Deferred[Result]:
        args.end()
        return self._expunge(None)

    def _do_UID_EXPUNGE(self, args: Arguments) -> Reply:
        """RFC 4315: only the \\Deleted messages among the given UIDs."""
        ranges = self._message_ranges(args.atom("UID set"), uid=True)
        args.end()
        return self._expunge(self._selected_uids(ranges))

    def _expunge(self, uids: list[int] | None) -> Deferred[Result]:
        view = self._writable_view()
        # The EXPUNGE responses come from the sync before the tagged OK, like everyone else's.
        return view.expunge(uids).addCallback(lambda _: ("OK", "", "EXPUNGE completed"))

    def _fetch(self, args: Arguments, uid: bool) -> Deferred[Result]:
        ranges = self._message_ranges(args.atom("sequence set"), uid)
        items = parse_fetch_items(args)
        view = self._selected_view()
        peeking = all(item.peek for item in items if isinstance(item, BodyFetch))
        sets_seen = not peeking and not view.readonly
        plan = FetchPlan(items, uid, sets_seen)
        unseen: list[int] = []
        if sets_seen:  # I2: a non-PEEK body fetch sets \Seen, and the FETCH reports the new flags
            messages = view.messages
            indices = chain.from_iterable(range(a, b) for a, b in ranges)
            unseen = [messages[i].uid for i in indices if "\\Seen" not in messages[i].flags]
        problems: list[int] = []

        def fetch(infos: Sequence[MessageInfo]) -> Deferred[Result]:
            changed = {info.uid: info for info in infos}
            d = self._bulk(self._fetch_work(plan, ranges, changed, problems))
            return d.addCallback(lambda _: self._fetched(problems))

        stored: Deferred[Sequence[MessageInfo]] = (
            view.store(unseen, ["\\Seen"], "+") if unseen else succeed(())
        )
        return stored.addCallback(fetch)

    @staticmethod
    def _fetched(problems: list[int]) -> Result:
        if problems:
            return ("NO", "EXPUNGEISSUED", "Some messages could not be fetched")
        return ("OK", "", "FETCH completed")

    def _fetch_work(
        self,
        plan: FetchPlan,
        ranges: Sequence[tuple[int, int]],
        changed: dict[int, MessageInfo],
        problems: list[int],
    ) -> Iterator[Deferred[Any] | None]:
        view = self._selected_view()
        messages = view.messages
        indices = chain.from_iterable(range(a, b) for a, b in ranges)
        batches = (
            _body_batches(messages, indices)
            if plan.needs_body
            else iter(lambda: list(islice(indices, META_BATCH)), [])
        )
        out: list[bytes] = []
        for batch in batches:
            if plan.needs_details:
                yield view.details([messages[i] for i in batch])
            bodies: dict[int, bytes] = {}
            if plan.needs_body:
                yield self._read_bodies(view, [messages[i] for i in batch], bodies)
            for index in batch:
                info = messages[index]
                info = changed.get(info.uid, info)
                message = None
                if plan.needs_body:
                    message = bodies.get(info.uid)
                    if message is None:  # expunged by another session since our snapshot, or a read error
                        problems.append(info.uid)
                        continue
                try:
                    response = plan.render(index + 1, info, message)
                except Exception:
                    self._internal_error("imap-fetch-error", Failure())
                    problems.append(info.uid)
                    continue
                out.append(response)
            self._write(out)
            yield None

    def _read_bodies(
        self, view: FolderView, infos: Sequence[MessageInfo], into: dict[int, bytes]
    ) -> Deferred[None]:
        """The files of ``infos`` into ``into`` by UID (FETCH and SEARCH BODY/TEXT).  Those
        expunged meanwhile are left out; any other failure is logged and leaves them all out
        (FETCH answers NO for them, SEARCH finds no text in them)."""

        def failed(failure: Failure) -> None:
            if not failure.check(MailboxError):
                self._internal_error("imap-read-error", failure)

        return view.open_messages(infos).addCallbacks(into.update, failed)

    def _store(self, args: Arguments, uid: bool) -> Reply:
        ranges = self._message_ranges(args.atom("sequence set"), uid)
        request = parse_store(args)
        view = self._writable_view()
        uids = self._selected_uids(ranges)
        if not uids:
            return ("OK", "", "STORE completed")

        answered: set[int] = set()

        def announce(infos: Sequence[MessageInfo]) -> None:
            if request.mode != "-" and infos:
                self._new_keywords(request.flags)  # before a FETCH that shows them

        def changed(infos: Sequence[MessageInfo]) -> None:
            """Changes reported while the store renames the rest: the client reads them meanwhile
            (unless it is not reading: then they wait for the end, as the unchanged ones do)."""
            if self._gone or self._output_paused:
                return
            announce(infos)
            answered.update(map(_uid_of, infos))
            self._write(self._flags_lines(infos, uid))

        def stored(infos: Sequence[MessageInfo]) -> Reply:
            announce(infos)
            if request.silent:
                return ("OK", "", "STORE completed")
            rest = [info for info in infos if info.uid not in answered] if answered else infos
            d = self._bulk(self._flags_work(rest, uid))
            return d.addCallback(lambda _: ("OK", "", "STORE completed"))

        progress = None if request.silent else changed
        return view.store(uids, request.flags, request.mode, progress).addCallback(stored)

    def _flags_work(self, infos: Sequence[MessageInfo], uid: bool) -> Iterator[None]:
        for start in range(0, len(infos), META_BATCH):
            self._write(self._flags_lines(infos[start : start + META_BATCH], uid))
            yield None

    def _flags_lines(self, infos: Sequence[MessageInfo], uid: bool) -> list[bytes]:
        """The untagged FETCH FLAGS of ``infos`` (ascending UIDs) in this session's numbers."""
        seqs = self._seqs_of([info.uid for info in infos])
        if 0 in seqs:  # unknown to this client (cannot happen for its own STORE; kept safe)
            infos = [info for info, seq in zip(infos, seqs, strict=True) if seq]
            seqs = [seq for seq in seqs if seq]
        return flags_responses(seqs, infos, uid)

    def _search(self, args: Arguments, uid: bool) -> Reply:
        try:
            keys = search_tokens(args.rest())
        except BadCharset:
            return ("NO", f"BADCHARSET ({' '.join(SEARCH_CHARSETS)})", "Unsupported charset")
        program = parse_search(keys)
        found: list[int] = []

        def answer(_: object) -> Result:
            self._out.append(b"* SEARCH" + b"".join(b" %d" % n for n in found) + b"\r\n")
            return ("OK", "", "SEARCH completed")

        return self._bulk(self._search_work(program, uid, found)).addCallback(answer)

    def _search_work(self, program: Program, uid: bool, found: list[int]) -> Iterator[Deferred[Any] | None]:
        view = self._selected_view()
        messages = view.messages
        if needs_details(program):
            yield view.details(messages)
        max_uid = messages[-1].uid if messages else 0
        now = self._clock.seconds()
        recent = view.recent
        body = needs_body(program)
        step = BODY_BATCH if body else META_BATCH
        for start in range(0, len(messages), step):
            batch = messages[start : start + step]
            bodies: dict[int, bytes] = {}
            if body:
                yield self._read_bodies(view, batch, bodies)
            # One context per batch: it caches the decoded texts of the messages it has read.
            context = SearchContext(len(messages), max_uid, now, recent, bodies.get)
            for seq, info in enumerate(batch, start + 1):
                if matches(program, info, seq, context):
                    found.append(info.uid if uid else seq)
            yield None

    def _copy(self, args: Arguments, uid: bool, move: bool) -> Reply:
        ranges = self._message_ranges(args.atom("sequence set"), uid)
        target = args.mailbox()
        args.end()
        view = self._writable_view() if move else self._selected_view()
        uids = self._selected_uids(ranges)
        verb = "MOVE" if move else "COPY"
        if not uids:
            return ("OK", "", f"{verb} completed")

        def copied(result: tuple[int, Sequence[tuple[int, int]]]) -> Reply:
            validity, pairs = result
            code = ""
            if pairs:
                sources = format_set(source for source, _ in pairs)
                targets = format_set(target for _, target in pairs)
                code = f"COPYUID {validity} {sources} {targets}"
            if not move:
                return ("OK", code, "COPY completed")
            # RFC 6851 §4.3: COPYUID comes untagged, before the EXPUNGE responses.
            if code:
                self._untagged(f"OK [{code}] Moved")
            d = view.store(uids, ["\\Deleted"], "+")
            d.addCallback(lambda _: self._expunge(uids))
            return d.addCallback(lambda _: ("OK", "", "MOVE completed"))

        # The store copies all or nothing (I9): a failure leaves the target as it was.
        return view.copy(uids, target).addCallback(copied)

    # --- logging ----------------------------------------------------------------------------------

    def _security(self, event: str, **fields: object) -> None:
        """A policy refusal for the security log, in the fields `kms.auth.session` uses."""
        if self._logs is not None:
            self._logs.security(event, self.client, protocol="imap", **fields)

    def _debug(self, event: str, **fields: object) -> None:
        if self._logs is not None:
            self._logs.debug("imap", event, self.client, **fields)


class IMAPFactory(Factory):
    """Builds `IMAPServer` for one listener; everything it needs is injected here.

    Its `cooperator` is shared by all its connections, so long FETCH and SEARCH responses take
    turns instead of one session holding the reactor.
    """

    noisy = False

    def __init__(
        self,
        settings: IMAPSettings,
        accounts: Callable[[str], Deferred[Account]],
        session_factory: Callable[[ClientInfo], LoginSession],
        tls_context: object | None,
        clock: IReactorTime | None = None,
        logs: IMAPLogs | None = None,
    ) -> None:
        """``accounts(identity)`` opens the logged-in user's mailboxes; ``tls_context`` enables STARTTLS."""
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.settings = settings
        self.accounts = accounts
        self.session_factory = session_factory
        self.tls_context = tls_context
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.logs = logs
        self.cooperator = Cooperator(scheduler=lambda work: self.clock.callLater(0, work))

    def buildProtocol(self, addr: object) -> IMAPServer:
        protocol = IMAPServer(
            self.settings,
            self.accounts,
            self.session_factory,
            self.tls_context,
            self.clock,
            self.cooperator,
            self.logs,
        )
        protocol.factory = self
        return protocol

    def refusal(self, verdict: Verdict) -> bytes:
        """The greeting of a connection over a limit (kms/limits.py): BYE, RFC 3501 7.1.5 / RFC 5530."""
        return f"* BYE [UNAVAILABLE] {REFUSAL_TEXT[verdict]}\r\n".encode()
