"""The seam between the mailbox store and the protocols that read it (IMAP, POP3).

`kms.store.mailbox` implements these; `kms.imap` and `kms.pop3` only use them.  Everything that
touches the disk returns a Deferred and runs in the store's thread pool; the snapshots the
protocols read (`FolderView.messages`) are plain in-memory values, so a FETCH over 100,000
messages builds its response from memory without a disk access per message.

Line endings: message files are stored as written (SMTP delivery writes LF; APPEND may bring
CRLF).  On the wire every bare LF becomes CRLF and an existing CRLF stays as it is; ``size`` is
the size in that wire form (RFC822.SIZE, POP3 LIST), so it matches what a client receives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")


class MailboxError(Exception):
    """A refused mailbox operation; ``code`` is an IMAP response code such as ``TRYCREATE``,
    ``NONEXISTENT``, ``ALREADYEXISTS``, ``CANNOT`` or ``OVERQUOTA`` (RFC 5530), or "" for none."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class MaildropLocked(Exception):
    """POP3: another session holds this user's maildrop (RFC 2449 ``[IN-USE]``)."""


class MessageDetails(Protocol):
    """Where a message's header section and analyzer ``meta`` are read from: the message's own
    (`KnownDetails`), or its folder's, which a cold load leaves on disk until a command needs them
    (`FolderView.details`), as a folder's SELECT needs only UIDs, sizes, dates and flags."""

    def headers_of(self, uid: int) -> bytes: ...

    def meta_of(self, uid: int) -> Mapping[str, object]: ...


@dataclass(frozen=True, slots=True)
class KnownDetails:
    """The details of one message, at hand (a message just analysed, or copied)."""

    headers: bytes
    meta: Mapping[str, object]

    def headers_of(self, uid: int) -> bytes:
        return self.headers

    def meta_of(self, uid: int) -> Mapping[str, object]:
        return self.meta


class DetailsNotLoaded(RuntimeError):
    """``headers`` or ``meta`` read before `FolderView.details` completed: a programming error."""


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message as the index knows it; immutable (a flag change makes a new one).  Slots: a
    folder holds one per message, and an instance dict would cost ~270 bytes more each.

    ``meta`` is what the store's analyzer (given by the IMAP layer, `kms.imap.message.analyze`)
    returned for the message when it was indexed: JSON-able values such as the ENVELOPE and
    BODYSTRUCTURE, cached in the index so FETCH and SEARCH never re-read the file.  ``headers``
    is the raw header section in wire form, for BODY.PEEK[HEADER.FIELDS] and header SEARCH.
    Both come through ``details``: for a folder opened from its index they are readable only
    after `FolderView.details` (else `DetailsNotLoaded`).
    """

    uid: int
    size: int  # wire size (CRLF line endings)
    internal_date: float  # seconds since the epoch
    flags: frozenset[str]
    details: MessageDetails

    @property
    def headers(self) -> bytes:
        return self.details.headers_of(self.uid)

    @property
    def meta(self) -> Mapping[str, object]:
        return self.details.meta_of(self.uid)


def message_info(
    uid: int,
    size: int,
    internal_date: float,
    flags: frozenset[str],
    headers: bytes,
    meta: Mapping[str, object],
) -> MessageInfo:
    """A `MessageInfo` whose details are at hand."""
    return MessageInfo(uid, size, internal_date, flags, KnownDetails(headers, meta))


def may_contain(meta: Mapping[str, object], key: str, text: str) -> bool:
    """False only when ``meta[key]`` is there and no string in it can contain ``text``: a
    SEARCH's quick test before it decodes a cached meta's item (the store's stored form,
    `kms.store.index.LazyMeta`, can tell at C speed); True for any other mapping."""
    test: Callable[[str, str], bool] | None = getattr(meta, "may_contain", None)
    return True if test is None else test(key, text)


@dataclass(frozen=True)
class FolderEvent:
    """What changed in a folder since a session last looked; sent to every other open view.

    ``added``: new messages (already in the folder's message list); ``expunged``: UIDs removed;
    ``flags``: messages whose flags changed (the new infos).
    """

    added: Sequence[MessageInfo] = ()
    expunged: Sequence[int] = ()
    flags: Sequence[MessageInfo] = ()


class FolderView(Protocol):
    """One session's open folder (IMAP SELECT/EXAMINE, POP3 maildrop).

    ``messages`` is this session's snapshot, in UID order; it changes only inside `sync`, so
    sequence numbers stay stable between the points where the protocol may announce changes
    (RFC 3501 §7.4.1: EXPUNGE only when no command with sequence numbers is in progress).
    """

    name: str  # IMAP mailbox name (UTF-8, "/"-delimited; "INBOX" for the inbox)
    uidvalidity: int
    uidnext: int
    readonly: bool
    messages: Sequence[MessageInfo]
    recent: frozenset[int]  # UIDs that are \Recent for this session (RFC 3501 §2.3.2)

    def sync(self) -> FolderEvent:
        """Apply every change queued for this view since the last sync (pure, in memory)."""

    def set_listener(self, listener: Callable[[], None] | None) -> None:
        """Called (on the reactor thread) whenever changes are queued for this view (IDLE)."""

    def refresh(self) -> Deferred[None]:
        """Look at the disk for changes made outside this process (new/ files); queue them."""

    def store(
        self,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: str,
        progress: Callable[[Sequence[MessageInfo]], None] | None = None,
    ) -> Deferred[Sequence[MessageInfo]]:
        """``mode`` is "+", "-" or "" (replace); renames the files (``:2,`` flags); updates every view.

        Returns the infos of every requested message still in the folder, changed or not.
        ``progress``, on the reactor thread, gets the changed ones batch by batch as their files
        are renamed, before the result (so a client can read about them while the rest go on).
        """

    def expunge(self, uids: Sequence[int] | None = None) -> Deferred[Sequence[int]]:
        """Remove the \\Deleted messages (only those among ``uids`` when given); the removed UIDs."""

    def copy(self, uids: Sequence[int], target: str) -> Deferred[tuple[int, Sequence[tuple[int, int]]]]:
        """Copy to folder ``target`` (hard links when possible); (target uidvalidity, [(src, dst)])."""

    def open_message(self, uid: int) -> Deferred[bytes]:
        """The message in wire form (CRLF), read in the thread pool."""

    def open_messages(self, messages: Sequence[MessageInfo]) -> Deferred[dict[int, bytes]]:
        """Several messages (of this view) in wire form, by UID, read in one thread-pool job
        (FETCH of bodies); messages expunged meanwhile are left out."""

    def details(self, messages: Iterable[MessageInfo]) -> Deferred[None]:
        """Make ``headers`` and ``meta`` readable for ``messages`` of this view: after a folder
        was opened from its index, those not read yet are read in the thread pool
        (ENVELOPE, header FETCH and header SEARCH need them; SELECT, FLAGS, STORE and bodies do not)."""

    def close(self) -> None:
        """The session leaves the folder (also on disconnect); releases a POP3 maildrop lock."""


@dataclass(frozen=True)
class FolderStatus:
    messages: int
    recent: int
    uidnext: int
    uidvalidity: int
    unseen: int


@dataclass(frozen=True)
class FolderListing:
    name: str  # UTF-8, "/"-delimited
    attributes: frozenset[str]  # \HasChildren, \HasNoChildren, \Noselect, \Sent, \Drafts, \Trash, \Junk
    subscribed: bool


class Account(Protocol):
    """One user's mailboxes; created on first login with INBOX, Sent, Drafts, Trash, Junk."""

    address: str

    def list(self) -> Deferred[Sequence[FolderListing]]: ...

    def open(self, name: str, readonly: bool = False) -> Deferred[FolderView]:
        """MailboxError("...", "NONEXISTENT") when there is no such folder."""

    def open_maildrop(self) -> Deferred[FolderView]:
        """POP3: INBOX with the exclusive per-user lock (MaildropLocked when taken)."""

    def status(self, name: str) -> Deferred[FolderStatus]: ...

    def create(self, name: str) -> Deferred[None]: ...

    def delete(self, name: str) -> Deferred[None]: ...

    def rename(self, old: str, new: str) -> Deferred[None]:
        """Renaming INBOX moves its messages to the new folder and leaves INBOX empty (RFC 3501)."""

    def subscribe(self, name: str, subscribed: bool) -> Deferred[None]: ...

    def append(
        self, name: str, data: bytes, flags: Sequence[str] = (), internal_date: float | None = None
    ) -> Deferred[tuple[int, int]]:
        """Durably add a message; (uidvalidity, uid) for APPENDUID. TRYCREATE if no such folder."""


Analyzer = Callable[[bytes], Mapping[str, object]]
"""Given a whole message in wire form, the JSON-able ``meta`` to cache for it (runs in a thread)."""
