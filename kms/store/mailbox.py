"""The mailbox store: Maildir++ folders behind the `Account` / `FolderView` contract.

Layout per user (``kms.store.maildir.mailbox_path``): the root maildir is INBOX, a folder ``A/B``
is the directory ``.A.B`` (`kms.store.names`), and each folder holds its messages (``cur/``,
``new/``, ``tmp/``), its ``kms-uidlist`` and its ``kms-index`` cache (`kms.store.index`).  The
root also holds ``kms-subscriptions`` (one name per line), whose presence means "first login done".

Threads: every disk access runs in the pool given to `MailStore`; everything the protocols see
(the folders' message lists, the views, the events) lives on the reactor thread and is changed
there only, when a thread job's result comes back.  Writes to one folder are serialised by that
folder's `DeferredLock` (two folders are locked in creation order, so COPY A→B and B→A cannot
deadlock); account-wide changes (create, delete, rename, subscribe) by the account's lock.

One `_Folder` per folder directory is shared by all of its views and kept in memory while any is
open, and for a while after (an LRU bounded by folders and messages), so a repeated SELECT costs
one listdir of ``new/``.  This process must be the only one changing the maildirs, except for
deliveries into ``new/`` (SMTP, in this process, calls `MailStore.delivered`).

Decisions worth knowing:

- \\Recent: a message is recent from the moment this process gives it a UID (found in ``new/`` or
  unknown in ``cur/`` when the folder is read, delivered, appended, copied in) until the first
  read-write view is told about it; that view lists it in ``recent``.  Read-only views see it
  without taking it.  ``FolderStatus.recent`` counts those not yet taken.
- DELETE of a folder with children removes the folder and its messages; the name stays, listed
  ``\\Noselect`` for as long as children exist (RFC 3501 §6.3.4).  Deleting such a ``\\Noselect``
  name answers NONEXISTENT.  CREATE makes only the named folder: missing parents are implied
  (listed ``\\Noselect``) until created themselves.  DELETE keeps the subscription (RFC 3501);
  RENAME moves the subscriptions of the folder and its children.
- SPECIAL-USE attributes belong to the top-level names Sent, Drafts, Trash and Junk.
- Keywords (flags without a backslash) live in the index cache only (see `kms.store.index`).
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import shutil
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from kms.fsutil import fsync_dir, replace_file
from kms.positions import delete_positions
from kms.store.cachedread import cached_reader
from kms.store.index import (
    Counts,
    Entry,
    FolderDetails,
    FolderFiles,
    Loaded,
    UidValidities,
    entries_of,
    flag_tally,
    normalize_flags,
)
from kms.store.interfaces import (
    Account,
    Analyzer,
    FolderEvent,
    FolderListing,
    FolderStatus,
    FolderView,
    MailboxError,
    MaildropLocked,
    MessageInfo,
)
from kms.store.maildir import ensure_maildir, mailbox_path
from kms.store.names import (
    DELIMITER,
    INBOX,
    canonical_name,
    folder_directory,
    folder_name,
    is_inferior,
    parent_names,
)
from kms.store.space import SpaceWatch
from kms.wireform import wire_form

log = Logger()
_T = TypeVar("_T")

SUBSCRIPTIONS = "kms-subscriptions"
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk"}
_DELETED_PREFIX = "kms-deleted-"  # a folder on its way out: renamed away first, then removed
_OPEN_RETRIES = 3
_INLINE_BYTES = 1 << 20  # read from the page cache on the reactor per call, at most (`read_cached`)
_DETAILS_BY_UID = 1000  # messages whose details are read by UID; more (or a quarter of the folder): all


_uid = attrgetter("uid")  # a C-level key: bisect calls it ~17 times per search


def _find(messages: Sequence[MessageInfo], uid: int) -> int | None:
    """Position of ``uid`` in a UID-ordered list, or None."""
    i = bisect_left(messages, uid, key=_uid)
    return i if i < len(messages) and messages[i].uid == uid else None


def locate(messages: Sequence[MessageInfo], uids: Iterable[int]) -> dict[int, int]:
    """UID → position for those of ``uids`` that are in a UID-ordered list: a binary search each,
    or, for a good part of the list (DELETE, STORE 1:*), one pass over it."""
    wanted = set(uids)
    if len(wanted) * 16 > len(messages):
        return {uid: i for i, uid in enumerate(map(_uid, messages)) if uid in wanted}
    return {uid: i for uid in wanted if (i := _find(messages, uid)) is not None}


def positions_of(messages: Sequence[MessageInfo], uids: Iterable[int]) -> list[int]:
    """Ascending positions of those of ``uids`` that are in a UID-ordered list."""
    return sorted(locate(messages, uids).values())


def merge_events(
    events: Sequence[FolderEvent], present: Callable[[set[int]], Collection[int]]
) -> FolderEvent:
    """Collapse queued events into one, relative to a snapshot (``present(uids)``: those of
    ``uids`` in it, asked once for all, as a STORE 1:* brings thousands).

    A message added and expunged before the sync never appears; a flag change of a message added
    in the same sync is folded into its ``added`` info; expunged UIDs are ascending and were all
    in the snapshot.
    """
    mentioned = {info.uid for event in events for info in event.flags}
    mentioned.update(uid for event in events for uid in event.expunged)
    known = present(mentioned) if mentioned else ()
    added: dict[int, MessageInfo] = {}
    expunged: set[int] = set()
    flags: dict[int, MessageInfo] = {}
    for event in events:
        for info in event.added:
            added[info.uid] = info
        for info in event.flags:
            if info.uid in added:
                added[info.uid] = info
            elif info.uid not in expunged and info.uid in known:
                flags[info.uid] = info
        for uid in event.expunged:
            if added.pop(uid, None) is None and uid in known:
                expunged.add(uid)
            flags.pop(uid, None)
    return FolderEvent(added=list(added.values()), expunged=sorted(expunged), flags=list(flags.values()))


def _disk_error(failure: Failure) -> NoReturn:
    """A full disk (or quota) is OVERQUOTA for the client (RFC 5530), not a server failure."""
    error = failure.value
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise MailboxError("not enough disk space", "OVERQUOTA")
    failure.raiseException()


def _no_spare(failure: Failure, folder: _Folder) -> None:
    """The next APPEND makes its own file, as it would without a spare (a full disk, say)."""
    failure.trap(OSError)
    log.warn("no spare file in {path}: {error}", path=folder.path, error=failure.value)


def _trycreate(failure: Failure) -> NoReturn:
    """APPEND/COPY into a folder that does not exist: TRYCREATE (RFC 3501 §6.3.11)."""
    error = failure.value
    if isinstance(error, MailboxError) and error.code == "NONEXISTENT":
        raise MailboxError("no such mailbox", "TRYCREATE")
    failure.raiseException()


class MailStore:
    """All users' mailboxes under ``mail_root``; one per process."""

    def __init__(
        self,
        mail_root: Path,
        pool: ThreadPool,
        reactor: Any,
        analyzer: Analyzer,
        *,
        idle_folders: int = 64,
        idle_messages: int = 200_000,
        space: SpaceWatch | None = None,
    ) -> None:
        self.mail_root = mail_root
        self._pool = pool
        self._reactor = reactor
        self.analyzer = analyzer
        self.uidvalidities = UidValidities()
        self._idle_folders = idle_folders
        self._idle_messages = idle_messages
        self._accounts: dict[str, _Account] = {}
        self._opening: dict[str, list[Deferred[Account]]] = {}
        self._folders: dict[Path, _Folder] = {}
        self._idle: OrderedDict[Path, _Folder] = OrderedDict()
        self._serial = itertools.count()
        self.maildrops: set[str] = set()
        self._space = space

    def run(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run blocking ``f`` in the store's pool; the result comes back on the reactor thread."""
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def from_pool(self, f: Callable[[_T], None]) -> Callable[[_T], None]:
        """``f`` as a pool job may call it: on the reactor thread, in order, before the job's result."""
        reactor = self._reactor
        return lambda value: reactor.callFromThread(f, value)

    def room(self) -> Deferred[None]:
        """Fails with ENOSPC (so: NO [OVERQUOTA]) while the store is below its hard limit (SPEC §8)."""
        return succeed(None) if self._space is None else self._space.room()

    def account(self, address: str) -> Deferred[Account]:
        """The user's mailboxes; the first call per address prepares the maildir and, on the
        very first login, the default folders (all later calls return the same object)."""
        key = address.lower()
        found = self._accounts.get(key)
        if found is not None:
            return succeed(found)
        waiting: Deferred[Account] = Deferred()
        if key in self._opening:
            self._opening[key].append(waiting)
            return waiting
        self._opening[key] = [waiting]

        def opened(root: Path) -> None:
            account = self._accounts[key] = _Account(self, key, root)
            for d in self._opening.pop(key):
                d.callback(account)

        def failed(failure: Failure) -> None:
            for d in self._opening.pop(key):
                d.errback(failure)

        self.run(_prepare_account, self.mail_root, key).addCallbacks(opened, failed)
        return waiting

    def delivered(self, address: str) -> None:
        """SMTP put new files into ``address``'s INBOX ``new/``: open views hear of them soon
        (one coalesced look at ``new/``, however many deliveries arrive meanwhile)."""
        account = self._accounts.get(address.lower())
        if account is None:
            return
        folder = self._folders.get(account.root)
        if folder is not None and folder.views:
            folder.request_refresh()

    def close(self) -> Deferred[None]:
        """Close every folder's files once its running operations are done (service stop)."""
        folders = list(self._folders.values())
        self._folders.clear()
        self._idle.clear()
        for folder in folders:
            folder.close_directory()
        closing = [f.lock.run(self._retire, f) for f in folders]
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)

    # -- folders (reactor side)

    def folder(self, path: Path, name: str) -> _Folder:
        """The shared folder object of ``path`` (made if needed; not loaded yet)."""
        found = self._folders.get(path)
        if found is None:
            files = FolderFiles(path, self.analyzer, self.uidvalidities)
            found = self._folders[path] = _Folder(self, files, name, next(self._serial))
        return found

    def locked(self, folders: Sequence[_Folder], work: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        """Run ``work`` holding the locks of ``folders`` (taken in creation order)."""
        ordered = sorted(set(folders), key=lambda f: f.serial)
        for folder in ordered:
            self._idle.pop(folder.path, None)

        def take(i: int) -> Deferred[_T]:
            if i == len(ordered):
                return maybeDeferred(work)
            return ordered[i].lock.run(take, i + 1)

        def settle(result: object) -> object:
            for folder in ordered:
                self.settle(folder)
            return result

        d = take(0)
        d.addBoth(settle)
        return d

    def settle(self, folder: _Folder) -> None:
        """A folder nobody uses any more: keep it loaded (LRU) or let it go."""
        if folder.views or folder.lock.locked or folder.lock.waiting:
            return
        if self._folders.get(folder.path) is not folder:
            return
        if not folder.loaded:
            self.forget(folder)
            return
        self._idle[folder.path] = folder
        self._idle.move_to_end(folder.path)
        total = sum(len(f.messages) for f in self._idle.values())
        while self._idle and (len(self._idle) > self._idle_folders or total > self._idle_messages):
            _, oldest = self._idle.popitem(last=False)
            total -= len(oldest.messages)
            self.forget(oldest)

    def forget(self, folder: _Folder) -> None:
        """Drop a folder from memory; its files are closed in the pool."""
        folder.close_directory()
        self._idle.pop(folder.path, None)
        if self._folders.get(folder.path) is folder:
            del self._folders[folder.path]
        self._retire(folder).addErrback(lambda f: log.failure("closing {path}", f, path=folder.path))

    def _retire(self, folder: _Folder) -> Deferred[None]:
        """Close a folder's files in the pool, leaving a snapshot of it for the next cold load."""
        return self.run(folder.files.retire, *folder.state())

    def moved(self, folder: _Folder, old: Path) -> None:
        """Re-key a folder whose directory was renamed (under its lock)."""
        if self._folders.get(old) is folder:
            del self._folders[old]
        self._idle.pop(old, None)
        self._folders[folder.path] = folder


class _Folder:
    """One folder's in-memory index, shared by every view of it (reactor thread only)."""

    def __init__(self, store: MailStore, files: FolderFiles, name: str, serial: int) -> None:
        self.store = store
        self.files = files
        self.name = name
        self.serial = serial
        self.lock = DeferredLock()
        self.loaded = False
        self.deleted = False
        self.uidvalidity = 0
        self.uidnext = 1
        self.messages: list[MessageInfo] = []  # UID order
        self.names: dict[int, str] = {}  # UID -> file name in cur/
        self.recent: set[int] = set()  # recent UIDs no read-write view has taken yet
        self.unseen = 0  # messages without \Seen (kept up to date by `_tally`)
        self.doomed: set[int] = set()  # UIDs of the messages with \Deleted (likewise)
        self.views: set[_View] = set()
        self.details: FolderDetails | None = None  # of the infos the load took from the cache
        self._cur: int | None = None  # descriptor of cur/ for `read_cached` (follows renames)
        self._refresh_queued = False

    @property
    def path(self) -> Path:
        return self.files.path

    def state(self) -> tuple[list[MessageInfo], dict[int, str]]:
        """Copies of the messages and their names, for a snapshot written in the pool as the folder
        leaves memory (`FolderFiles.retire`); nothing for a folder deleted or never loaded."""
        if self.deleted or not self.loaded:
            return [], {}
        return list(self.messages), dict(self.names)

    # The methods below run with the folder's lock held.

    def ensure_loaded(self) -> Deferred[None]:
        if self.deleted:
            return fail(MailboxError("mailbox deleted", "NONEXISTENT"))
        if self.loaded:
            return succeed(None)
        return self.store.run(self.files.load).addCallback(self._loaded)

    def fresh(self) -> Deferred[None]:
        """Loaded, and up to date with ``new/``."""
        if self.deleted or not self.loaded:
            return self.ensure_loaded()
        return self.store.run(self.files.ingest).addCallback(self.add)

    def _loaded(self, loaded: Loaded) -> None:
        self.uidvalidity, self.uidnext = loaded.uidvalidity, loaded.uidnext
        self.messages, self.names = loaded.infos, loaded.names
        self.unseen, self.doomed = loaded.unseen, set(loaded.deleted)
        self.recent.update(loaded.recent)
        self.details = loaded.details
        self.loaded = True

    def read_cached(self, name: str, limit: int) -> bytes | None:
        """File ``name`` of cur/ read here, on the reactor, if the kernel has all of it cached
        (`kms.store.cachedread`), else None.  cur/'s descriptor is opened and closed on the
        reactor thread too (`close_directory`), so no other thread can close it under a read."""
        if not cached_reader.enabled or self.deleted:
            return None
        if self._cur is None:
            self._cur = cached_reader.open_directory(os.path.join(self.path, "cur"))
            if self._cur is None:
                return None
        return cached_reader.read(self._cur, name, limit)

    def cached_wire(self, name: str, size: int) -> bytes | None:
        """`read_cached` of a message indexed at wire ``size``, in wire form (a file that long has
        no bare LF: returned as read)."""
        raw = self.read_cached(name, size)
        return None if raw is None else raw if len(raw) == size else wire_form(raw)

    def close_directory(self) -> None:
        if self._cur is not None:
            os.close(self._cur)
            self._cur = None

    def unread(self, infos: Iterable[MessageInfo]) -> list[int]:
        """UIDs of those ``infos`` whose details are the load's and not read yet (a message
        analysed in this process carries its own: nothing to read for it)."""
        details = self.details
        if details is None or details.complete:
            return []
        return details.missing(info.uid for info in infos if info.details is details)

    def load_details(self, uids: Iterable[int]) -> Deferred[None]:
        """Make ``headers`` and ``meta`` of messages ``uids`` readable (`FolderDetails`), reading
        those not read yet from the cache; when they are many, the whole folder's at once."""
        details = self.details
        missing = [] if details is None else details.missing(uids)
        if not missing:
            return succeed(None)
        whole = len(missing) > max(_DETAILS_BY_UID, len(self.messages) // 4)
        d = self.store.run(self.files.read_details, None if whole else missing, self.names)
        return d.addCallback(details.add, whole)  # type: ignore[union-attr]

    def _tally(self, infos: Iterable[MessageInfo], sign: int) -> None:
        """``infos`` joined (+1) or left (-1) the folder: the counts follow, at no cost per message
        that did not change."""
        unseen, deleted = flag_tally(infos)
        self.unseen += sign * unseen
        if sign > 0:
            self.doomed.update(deleted)
        else:
            self.doomed.difference_update(deleted)

    def add(self, entries: Sequence[Entry]) -> None:
        """New messages (UIDs above all present ones): into the index, and to every view."""
        self.uidnext = self.files.uidnext
        if not entries:
            return
        infos = [e.info for e in entries]
        self.messages.extend(infos)
        self._tally(infos, 1)
        self.names.update((e.info.uid, e.name) for e in entries)
        self.recent.update(info.uid for info in infos)
        self.publish(FolderEvent(added=infos))

    def replace(self, positions: Sequence[int], infos: Sequence[MessageInfo], names: Sequence[str]) -> None:
        """Messages with new flags (and file names): ``infos[k]`` replaces the message at
        ``positions[k]`` (found by the caller under the same lock hold)."""
        messages = self.messages
        old = list(map(messages.__getitem__, positions))
        deque(map(messages.__setitem__, positions, infos), maxlen=0)
        self.names.update(zip(map(_uid, infos), names, strict=True))
        self._tally(old, -1)
        self._tally(infos, 1)

    def drop(self, uids: Iterable[int]) -> None:
        """Messages leave the folder (expunged, moved away, or the folder deleted)."""
        positions = positions_of(self.messages, uids)
        if not positions:
            return
        gone = [self.messages[i] for i in positions]
        delete_positions(self.messages, positions)
        self._tally(gone, -1)
        expunged = [info.uid for info in gone]
        for uid in expunged:
            del self.names[uid]
        self.recent.difference_update(expunged)
        self.publish(FolderEvent(expunged=expunged))

    def entries(self, uids: Iterable[int]) -> list[Entry]:
        messages, names = self.messages, self.names
        picked = [messages[i] for i in positions_of(messages, uids)]
        return entries_of(zip(picked, [names[info.uid] for info in picked], strict=True))

    def publish(self, event: FolderEvent) -> None:
        for view in list(self.views):
            view.queue(event)

    def request_refresh(self) -> None:
        if self._refresh_queued:
            return
        self._refresh_queued = True

        def refresh() -> Deferred[None]:
            self._refresh_queued = False
            return self.fresh()

        self.store.locked([self], refresh).addErrback(
            lambda f: log.failure("refreshing {path}", f, path=self.path)
        )

    def status(self) -> FolderStatus:
        return FolderStatus(len(self.messages), len(self.recent), self.uidnext, self.uidvalidity, self.unseen)


class _View:
    """One session's view of a folder (`FolderView`).

    ``messages`` changes only in `sync`, in place (an expunge deletes by position, so its cost
    follows the number of messages removed, not the folder's size).  ``recent`` holds the UIDs
    that are \\Recent for this session.  `store` applies the caller's own flag changes to its
    snapshot at once (they move no sequence numbers); every other change, the caller's EXPUNGE
    and APPEND included, reaches each view, the caller's too, through `sync`.
    """

    def __init__(
        self, account: _Account, folder: _Folder, readonly: bool, on_close: Callable[[], None] | None = None
    ) -> None:
        self._account = account
        self._folder = folder
        self._on_close = on_close
        self.name = folder.name
        self.readonly = readonly
        self.uidvalidity = folder.uidvalidity
        self.uidnext = folder.uidnext
        self._messages = list(folder.messages)  # the snapshot; mutated only in sync() and store()
        self.messages: Sequence[MessageInfo] = self._messages
        self.recent: frozenset[int] = frozenset(folder.recent)
        if not readonly:
            folder.recent.clear()
        self._pending: list[FolderEvent] = []
        self._listener: Callable[[], None] | None = None
        self._closed = False
        folder.views.add(self)

    def queue(self, event: FolderEvent) -> None:
        self._pending.append(event)
        if self._listener is not None:
            try:
                self._listener()
            except Exception:
                log.failure("folder listener of {name}", name=self.name)

    def set_listener(self, listener: Callable[[], None] | None) -> None:
        self._listener = listener

    def sync(self) -> FolderEvent:
        pending, self._pending = self._pending, []
        self.uidnext = self._folder.uidnext
        if not pending:
            return FolderEvent()
        messages = self._messages
        event = merge_events(pending, lambda uids: locate(messages, uids).keys())
        if event.expunged:
            delete_positions(messages, positions_of(messages, event.expunged))
            self.recent = self.recent.difference(event.expunged)
        changed = []  # flags this session's own STORE already applied are not news
        at = locate(messages, [info.uid for info in event.flags]) if event.flags else {}
        for info in event.flags:
            i = at.get(info.uid)
            if i is not None and messages[i] is not info:
                messages[i] = info
                changed.append(info)
        if event.added:
            self._messages.extend(event.added)
            shared = self._folder.recent
            taken = {info.uid for info in event.added if info.uid in shared}
            if taken:
                self.recent |= taken
                if not self.readonly:
                    shared -= taken
        return FolderEvent(added=event.added, expunged=event.expunged, flags=changed)

    def refresh(self) -> Deferred[None]:
        refused = self._refused(write=False)
        if refused:
            return refused
        return self._folder.store.locked([self._folder], self._folder.fresh)

    def store(
        self,
        uids: Sequence[int],
        flags: Sequence[str],
        mode: str,
        progress: Callable[[Sequence[MessageInfo]], None] | None = None,
    ) -> Deferred[Sequence[MessageInfo]]:
        """Returns the infos of every requested message still in the folder, changed or not."""
        refused = self._refused(write=True)
        if refused:
            return refused
        if mode not in ("+", "-", ""):
            return fail(ValueError(f"bad STORE mode {mode!r}"))
        wanted = normalize_flags(flags)
        folder = self._folder

        def work() -> Deferred[Sequence[MessageInfo]]:
            if folder.deleted:
                return fail(MailboxError("mailbox deleted", "NONEXISTENT"))
            messages = folder.messages
            positions = positions_of(messages, uids)
            # The outcome per distinct flag set (a handful), not per message.
            outcome: dict[frozenset[str], frozenset[str]] = {}
            for old in {messages[i].flags for i in positions}:
                outcome[old] = normalize_flags(
                    old | wanted if mode == "+" else old - wanted if mode == "-" else wanted
                )
            moving = {old for old, new in outcome.items() if new != old}
            at = [i for i in positions if messages[i].flags in moving] if moving else []
            if not at:
                return succeed([messages[i] for i in positions])
            targets = [messages[i] for i in at]
            names = list(map(folder.names.__getitem__, map(_uid, targets)))
            report = None if progress is None else folder.store.from_pool(progress)
            d = folder.store.run(folder.files.set_flags, targets, names, outcome, report)
            return d.addCallback(applied, at, positions)

        def applied(
            result: tuple[list[MessageInfo], list[str]], at: list[int], positions: list[int]
        ) -> Sequence[MessageInfo]:
            changed, names = result
            if len(changed) != len(at):  # some files vanished: find the positions of the others
                at = positions_of(folder.messages, map(_uid, changed))
            folder.replace(at, changed, names)
            if changed:
                # Queued for this view too, so an older change queued by another session cannot
                # overwrite this one at the next sync; sync does not report it twice.
                folder.publish(FolderEvent(flags=changed))
                mine = self._messages
                by_uid = dict(zip(map(_uid, changed), changed, strict=True))
                for uid, position in locate(mine, by_uid).items():  # not yet synced here: left out
                    mine[position] = by_uid[uid]
            messages = folder.messages
            return [messages[i] for i in positions]

        return folder.store.locked([folder], work)

    def expunge(self, uids: Sequence[int] | None = None) -> Deferred[Sequence[int]]:
        refused = self._refused(write=True)
        if refused:
            return refused
        folder = self._folder
        only = None if uids is None else set(uids)

        def work() -> Deferred[Sequence[int]]:
            targets = folder.entries(folder.doomed if only is None else folder.doomed.intersection(only))
            if not targets:
                return succeed([])
            return folder.store.run(folder.files.remove, targets).addCallback(removed, targets)

        def removed(_: None, targets: list[Entry]) -> Sequence[int]:
            gone = [e.info.uid for e in targets]
            folder.drop(gone)
            return gone

        return folder.store.locked([folder], work)

    def copy(self, uids: Sequence[int], target: str) -> Deferred[tuple[int, Sequence[tuple[int, int]]]]:
        refused = self._refused(write=False)
        if refused:
            return refused
        try:
            destination = self._account.folder(target)
        except MailboxError as e:
            return fail(e)
        source = self._folder
        store = source.store

        def place(_: None) -> Deferred[tuple[int, Sequence[tuple[int, int]]]]:
            sources = [(source.path / "cur" / e.name, e) for e in source.entries(uids)]
            return store.run(destination.files.import_files, sources, False).addCallback(copied)

        def work() -> Deferred[tuple[int, Sequence[tuple[int, int]]]]:
            d = source.load_details(source.unread(e.info for e in source.entries(uids)))
            d.addCallback(lambda _: destination.ensure_loaded())
            return d.addErrback(_trycreate).addCallback(place)

        def copied(made: list[tuple[int, Entry]]) -> tuple[int, Sequence[tuple[int, int]]]:
            destination.add([e for _, e in made])
            return destination.uidvalidity, [(src, e.info.uid) for src, e in made]

        d = store.room().addCallback(lambda _: store.locked([source, destination], work))
        return d.addErrback(_disk_error)

    def open_message(self, uid: int) -> Deferred[bytes]:
        """One message (POP3 RETR): at once when the kernel has its file cached, else
        `open_messages` of it (the pool job and its retries)."""
        refused = self._refused(write=False)
        if refused:
            return refused
        folder = self._folder
        messages = folder.messages
        at = _find(messages, uid)
        if at is None:
            return fail(MailboxError(f"message {uid} has been expunged", "EXPUNGEISSUED"))
        info = messages[at]
        data = folder.cached_wire(folder.names[uid], info.size) if info.size <= _INLINE_BYTES else None
        if data is not None:
            return succeed(data)

        def one(found: dict[int, bytes]) -> bytes:
            if uid not in found:  # its file vanished for good
                raise MailboxError(f"message {uid} has been expunged", "EXPUNGEISSUED")
            return found[uid]

        return self.open_messages([info]).addCallback(one)

    def open_messages(self, messages: Sequence[MessageInfo]) -> Deferred[dict[int, bytes]]:
        """Files the kernel has cached are read at once (`Folder.read_cached`, up to
        `_INLINE_BYTES`), the rest in one lock-free pool job; files renamed meanwhile (a flag
        change in flight) are read again under the folder lock, when their new names are known."""
        refused = self._refused(write=False)
        if refused:
            return refused
        folder = self._folder
        found: dict[int, bytes] = {}
        sizes = {info.uid: info.size for info in messages}

        def read(wanted: Iterable[int], attempt: int) -> Deferred[dict[int, bytes]]:
            names = folder.names
            files = {uid: (name, sizes[uid]) for uid in wanted if (name := names.get(uid)) is not None}
            if attempt == 0:
                budget = _INLINE_BYTES
                for uid, (name, size) in list(files.items()):
                    if size > budget:
                        break
                    data = folder.cached_wire(name, size)
                    if data is not None:
                        found[uid] = data
                        del files[uid]
                        budget -= size
            if not files:
                return succeed(found)
            return folder.store.run(folder.files.read_many, files).addCallback(got, attempt)

        def got(
            result: tuple[dict[int, bytes], list[int]], attempt: int
        ) -> dict[int, bytes] | Deferred[dict[int, bytes]]:
            done, vanished = result
            found.update(done)
            if not vanished or attempt == _OPEN_RETRIES:
                return found
            return folder.store.locked([folder], lambda: read(vanished, attempt + 1))

        return read(sizes, 0)

    def details(self, messages: Iterable[MessageInfo]) -> Deferred[None]:
        """Immediate when all are read already (no wait for the folder's lock behind a STORE)."""
        folder = self._folder
        if folder.details is None or folder.details.complete:
            return succeed(None)
        refused = self._refused(write=False)
        if refused:
            return refused
        wanted = folder.unread(messages)
        if not wanted:
            return succeed(None)
        return folder.store.locked([folder], lambda: folder.load_details(wanted))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._listener = None
        self._folder.views.discard(self)
        self._folder.store.settle(self._folder)
        if self._on_close is not None:
            self._on_close()

    def _refused(self, write: bool) -> Deferred[Any] | None:
        if self._closed:
            return fail(MailboxError("mailbox closed", "CANNOT"))
        if self._folder.deleted:
            return fail(MailboxError("mailbox deleted", "NONEXISTENT"))
        if write and self.readonly:
            return fail(MailboxError("mailbox is read-only", "CANNOT"))
        return None


class _Account:
    """One user's folders (`Account`)."""

    def __init__(self, store: MailStore, address: str, root: Path) -> None:
        self.store = store
        self.address = address
        self.root = root
        self.lock = DeferredLock()  # create, delete, rename, subscribe

    def folder(self, name: str) -> _Folder:
        """The folder object of a (hostile) name; MailboxError CANNOT for refused names."""
        canonical = canonical_name(name)
        return self.store.folder(self.root / folder_directory(canonical), canonical)

    def _with_folder(self, name: str, work: Callable[[_Folder], Deferred[_T]]) -> Deferred[_T]:
        try:
            folder = self.folder(name)
        except MailboxError as e:
            return fail(e)
        return self.store.locked([folder], lambda: work(folder))

    def list(self) -> Deferred[Sequence[FolderListing]]:
        return self.store.run(_list_folders, self.root)

    def open(self, name: str, readonly: bool = False) -> Deferred[FolderView]:
        return self._open(name, readonly, None)

    def _open(self, name: str, readonly: bool, on_close: Callable[[], None] | None) -> Deferred[FolderView]:
        def work(folder: _Folder) -> Deferred[FolderView]:
            def view(_: None) -> FolderView:
                return _View(self, folder, readonly, on_close)

            return folder.fresh().addCallback(view)

        return self._with_folder(name, work)

    def open_maildrop(self) -> Deferred[FolderView]:
        drops = self.store.maildrops
        if self.address in drops:
            return fail(MaildropLocked(f"maildrop of {self.address} is in use"))
        drops.add(self.address)

        def release() -> None:
            drops.discard(self.address)

        def failed(failure: Failure) -> Failure:
            release()
            return failure

        return self._open(INBOX, False, release).addErrback(failed)

    def status(self, name: str) -> Deferred[FolderStatus]:
        """A loaded folder answers from memory; one that is not is counted from its cache and a
        listdir (`FolderFiles.counts`), and loaded only if that cannot answer."""

        def work(folder: _Folder) -> Deferred[FolderStatus]:
            if folder.loaded or folder.deleted:
                return loaded(folder)
            return self.store.run(folder.files.counts).addCallback(counted, folder)

        def counted(counts: Counts | None, folder: _Folder) -> FolderStatus | Deferred[FolderStatus]:
            if counts is None:
                return loaded(folder)
            return FolderStatus(
                counts.messages, counts.new, counts.uidnext, counts.uidvalidity, counts.unseen
            )

        def loaded(folder: _Folder) -> Deferred[FolderStatus]:
            return folder.fresh().addCallback(lambda _: folder.status())

        return self._with_folder(name, work)

    def create(self, name: str) -> Deferred[None]:
        try:
            canonical = canonical_name(name)
            directory = folder_directory(canonical)
        except MailboxError as e:
            return fail(e)
        if canonical == INBOX:
            return fail(MailboxError("INBOX always exists", "ALREADYEXISTS"))
        return self.lock.run(self.store.run, _create_folder, self.root / directory)

    def delete(self, name: str) -> Deferred[None]:
        try:
            folder = self.folder(name)
        except MailboxError as e:
            return fail(e)
        if folder.name == INBOX:
            return fail(MailboxError("INBOX cannot be deleted", "CANNOT"))

        def work() -> Deferred[None]:
            return self.store.run(_delete_folder, self.root, folder.files).addCallback(deleted)

        def deleted(_: None) -> None:
            folder.deleted = True
            folder.drop([m.uid for m in folder.messages])
            self.store.forget(folder)

        return self.lock.run(lambda: self.store.locked([folder], work))

    def rename(self, old: str, new: str) -> Deferred[None]:
        try:
            source, target = canonical_name(old), canonical_name(new)
            source_dir, target_dir = folder_directory(source), folder_directory(target)
        except MailboxError as e:
            return fail(e)
        if target == INBOX or source == target:
            return fail(MailboxError(f"{target} already exists", "ALREADYEXISTS"))
        if is_inferior(target, source):
            return fail(MailboxError("a mailbox cannot move below itself", "CANNOT"))
        if source == INBOX:
            return self.lock.run(self._rename_inbox, target, self.root / target_dir)
        return self.lock.run(self._rename, source, target, source_dir, target_dir)

    def _rename(self, source: str, target: str, source_dir: str, target_dir: str) -> Deferred[None]:
        """Plan in the pool, lock every folder that moves, move them, then re-key the objects."""

        def plan(moves: list[tuple[str, str]]) -> Deferred[None]:
            folders = [self.store.folder(self.root / old, folder_name(old)) for old, _ in moves]
            # Objects for the target paths exist only for operations racing with this rename
            # (e.g. an APPEND about to answer TRYCREATE): they must not load the moved folders.
            targets = [self.store.folder(self.root / new, folder_name(new)) for _, new in moves]

            def work() -> Deferred[None]:
                return self.store.run(_move_folders, self.root, moves).addCallback(moved)

            def moved(_: None) -> None:
                for target in targets:
                    target.deleted = True
                    self.store.forget(target)
                for folder, (_old, new_dir) in zip(folders, moves, strict=True):
                    old_path = folder.path
                    folder.files.path = self.root / new_dir
                    folder.name = folder_name(new_dir)
                    for view in folder.views:
                        view.name = folder.name
                    self.store.moved(folder, old_path)

            return self.store.locked(folders + targets, work)

        def subscriptions(_: None) -> Deferred[None]:
            return self.store.run(_rename_subscriptions, self.root, source, target)

        return (
            self.store.run(_plan_moves, self.root, source_dir, target_dir)
            .addCallback(plan)
            .addCallback(subscriptions)
        )

    def _rename_inbox(self, target: str, target_path: Path) -> Deferred[None]:
        """RFC 3501 §6.3.5: INBOX's messages move to a new folder; INBOX stays, empty."""
        inbox = self.folder(INBOX)

        def created(_: None) -> Deferred[None]:
            destination = self.store.folder(target_path, target)

            def work() -> Deferred[None]:
                d = inbox.fresh().addCallback(lambda _: inbox.load_details(inbox.unread(inbox.messages)))
                return d.addCallback(lambda _: destination.ensure_loaded()).addCallback(move)

            def move(_: None) -> Deferred[None]:
                sources = [(inbox.path / "cur" / e.name, e) for e in inbox.entries(inbox.names)]
                return self.store.run(destination.files.import_files, sources, True).addCallback(moved)

            def moved(made: list[tuple[int, Entry]]) -> Deferred[None]:
                destination.add([e for _, e in made])
                gone = inbox.entries(src for src, _ in made)

                def forgotten(_: None) -> None:
                    inbox.drop([e.info.uid for e in gone])

                return self.store.run(inbox.files.remove, gone, False).addCallback(forgotten)

            return self.store.locked([inbox, destination], work)

        return self.store.run(_create_folder, target_path).addCallback(created)

    def subscribe(self, name: str, subscribed: bool) -> Deferred[None]:
        try:
            canonical = canonical_name(name)
        except MailboxError as e:
            return fail(e)
        return self.lock.run(self.store.run, _subscribe, self.root, canonical, subscribed)

    def append(
        self, name: str, data: bytes, flags: Sequence[str] = (), internal_date: float | None = None
    ) -> Deferred[tuple[int, int]]:
        """The reply fires as soon as the message is durable; the folder's lock is held a little
        longer, while the pool makes the file the next APPEND will write (`prepare_append`), so
        that work overlaps this client reading the reply and sending its next command."""
        wanted = normalize_flags(flags)
        done: Deferred[tuple[int, int]] = Deferred()

        def work(folder: _Folder) -> Deferred[None]:
            def write(_: None) -> Deferred[Entry]:
                return self.store.run(folder.files.append, data, wanted, internal_date)

            def appended(entry: Entry) -> Deferred[None]:
                folder.add([entry])
                done.callback((folder.uidvalidity, entry.info.uid))
                return self.store.run(folder.files.prepare_append).addErrback(_no_spare, folder)

            return folder.ensure_loaded().addErrback(_trycreate).addCallback(write).addCallback(appended)

        def failed(failure: Failure) -> None:
            if not done.called:
                done.errback(failure)
            else:
                log.failure("preparing the next APPEND in {name}", failure, name=name)

        self.store.room().addCallback(lambda _: self._with_folder(name, work)).addErrback(failed)
        return done.addErrback(_disk_error)


# --- account-level blocking work (thread pool) -------------------------------------------------


def _prepare_account(mail_root: Path, address: str) -> Path:
    """The user's root maildir, made on first use; default folders and subscriptions on the first
    login (no subscriptions file yet); remains of interrupted deletes removed."""
    root = mailbox_path(mail_root, address)
    ensure_maildir(root)
    for entry in os.listdir(root):
        if entry.startswith(_DELETED_PREFIX):
            shutil.rmtree(root / entry, ignore_errors=True)
    if not (root / SUBSCRIPTIONS).exists():
        for name in SPECIAL_USE:
            ensure_maildir(root / folder_directory(name))
        _write_subscriptions(root, [INBOX, *SPECIAL_USE])
    return root


def _folder_directories(root: Path) -> list[str]:
    """Directories of the root that are folders (names that round-trip; anything else ignored)."""
    found = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                try:
                    folder_name(entry.name)
                except ValueError:
                    continue
                found.append(entry.name)
    return found


def _list_folders(root: Path) -> list[FolderListing]:
    """Every folder, implied parents (``\\Noselect``), and subscribed names that do not exist
    (``\\NonExistent``, for LSUB and LIST (SUBSCRIBED), RFC 5258); INBOX first."""
    subscribed = set(_read_subscriptions(root))
    real = {INBOX} | {folder_name(d) for d in _folder_directories(root)}
    implied = {p for n in real for p in parent_names(n)} - real
    parents = {p for n in real for p in parent_names(n)}
    listings = []
    for name in sorted(real | implied | subscribed, key=lambda n: (n != INBOX, n)):
        attributes = {"\\HasChildren" if name in parents else "\\HasNoChildren"}
        if name in implied:
            attributes.add("\\Noselect")
        elif name not in real:
            attributes = {"\\NonExistent", "\\HasNoChildren"}
        if name in SPECIAL_USE and name in real:
            attributes.add(SPECIAL_USE[name])
        listings.append(FolderListing(name, frozenset(attributes), name in subscribed))
    return listings


def _create_folder(path: Path) -> None:
    if path.exists():
        raise MailboxError(f"{folder_name(path.name)} already exists", "ALREADYEXISTS")
    ensure_maildir(path)


def _delete_folder(root: Path, files: FolderFiles) -> None:
    """Rename the folder out of sight first (one atomic step), then remove it at leisure."""
    path = files.path
    if not path.is_dir():
        raise MailboxError("no such mailbox", "NONEXISTENT")
    doomed = root / f"{_DELETED_PREFIX}{secrets.token_hex(8)}"
    os.rename(path, doomed)
    fsync_dir(root)
    files.close()
    shutil.rmtree(doomed, ignore_errors=True)


def _plan_moves(root: Path, source_dir: str, target_dir: str) -> list[tuple[str, str]]:
    """The directory renames for RENAME: the folder and all its children (``.A`` and ``.A.*``)."""
    directories = set(_folder_directories(root))
    if source_dir not in directories:
        raise MailboxError("no such mailbox", "NONEXISTENT")
    moves = [
        (d, target_dir + d[len(source_dir) :])
        for d in sorted(directories)
        if d == source_dir or d.startswith(source_dir + ".")
    ]
    for _, new in moves:
        if new in directories or (root / new).exists():
            raise MailboxError(f"{folder_name(new)} already exists", "ALREADYEXISTS")
        if len(new) > 255:
            raise MailboxError("mailbox name too long once renamed", "CANNOT")
    return moves


def _move_folders(root: Path, moves: Sequence[tuple[str, str]]) -> None:
    for old, new in moves:
        os.rename(root / old, root / new)
    fsync_dir(root)


def _read_subscriptions(root: Path) -> list[str]:
    try:
        text = (root / SUBSCRIPTIONS).read_text("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    names = []
    for line in text.splitlines():
        try:
            names.append(canonical_name(line))
        except MailboxError:
            continue
    return names


def _write_subscriptions(root: Path, names: Iterable[str]) -> None:
    data = "".join(f"{n}\n" for n in dict.fromkeys(names)).encode("utf-8")
    replace_file(root / SUBSCRIPTIONS, data, 0o600, sync_dir=True)


def _subscribe(root: Path, name: str, subscribed: bool) -> None:
    names = _read_subscriptions(root)
    if subscribed and name not in names:
        _write_subscriptions(root, [*names, name])
    elif not subscribed and name in names:
        _write_subscriptions(root, [n for n in names if n != name])


def _rename_subscriptions(root: Path, source: str, target: str) -> None:
    names = _read_subscriptions(root)
    renamed = [
        target + n[len(source) :] if n == source or n.startswith(source + DELIMITER) else n for n in names
    ]
    if renamed != names:
        _write_subscriptions(root, renamed)
