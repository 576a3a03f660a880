"""kmsctl: the administrator's command line (SPEC §1, §3).

It works on the store directly (the user DB is SQLite in WAL mode), so it runs whether or not the
server does.  Run it as the user the server runs as: files it creates (``users.db``, ``store.key``)
are private to their owner.  Passwords come from the terminal, asked twice, or from one line of
standard input with ``--password-stdin``; never from the command line, where ``ps`` would show them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sqlite3
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from kms import __version__, updatechecker, updates
from kms.auth import master
from kms.auth.directory import DirectoryClient, DirectorySettings
from kms.auth.errors import TemporaryAuthFailure
from kms.auth.lockout import LockoutDB, account_name
from kms.auth.matrix import method_warnings, usable_methods
from kms.auth.passwords import InvalidToken, StoreKey, StoreKeyError
from kms.config import Config, ConfigError, config_warnings, load_config, runtime_problems
from kms.logs import Logs
from kms.queue import schedule
from kms.queue.interfaces import PENDING, QueueEntry
from kms.queue.store import DamagedEntry, EntryBusy, NoSuchEntry, QueueStore, check_id
from kms.store import space
from kms.store.users import DuplicateUser, NoSuchUser, UserDB, normalize_address, reversible_password
from kms.tls import generate_dev_certificate

DEFAULT_CONFIG = Path("etc/kms.toml")


class CtlError(Exception):
    """A problem to report on stderr in one line, with exit code 1."""


def _store_dir(cfg: Config) -> Path:
    """The store folder, created 0750 on first use; its parent must exist, as for the server."""
    path = cfg.store.path
    try:
        path.mkdir(mode=0o750)
    except FileExistsError:
        pass
    except FileNotFoundError as e:
        raise CtlError(f"store.path: parent folder {path.parent} does not exist") from e
    return path


def _userdb(cfg: Config) -> UserDB:
    return UserDB(_store_dir(cfg) / "users.db")


def _store_key(cfg: Config) -> StoreKey:
    return StoreKey.load_or_create(_store_dir(cfg) / "store.key")


def _address(text: str) -> str:
    try:
        return normalize_address(text)
    except ValueError as e:
        raise CtlError(str(e)) from e


def _local_address(text: str, cfg: Config) -> str:
    """The canonical address of a new user, which must belong to one of ``domains.local``.

    Only new users are held to this: users of a domain since removed must stay manageable.
    """
    address = _address(text)
    domain = address.partition("@")[2]
    if domain not in cfg.domains.local:
        raise CtlError(f"{domain} is not a local domain (domains.local: {', '.join(cfg.domains.local)})")
    return address


def _read_password(from_stdin: bool) -> str:
    """One line of stdin, or the terminal asked twice; an empty password is refused."""
    if from_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Password again: ")
        except (EOFError, KeyboardInterrupt) as e:
            raise CtlError("cancelled") from e
        if password != again:
            raise CtlError("passwords do not match")
    if not password:
        raise CtlError("empty password refused")
    return password


def _timestamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _user_add(cfg: Config, args: argparse.Namespace) -> int:
    address = _local_address(args.address, cfg)
    if args.source == "directory" and (args.password_stdin or args.storage):
        raise CtlError("directory users have no local password: drop --password-stdin and --storage")
    db = _userdb(cfg)
    try:
        if db.get(address) is not None:
            raise CtlError(f"{address} already exists")
        if args.source == "directory":
            record = db.add(address, None, "directory", _store_key(cfg))
        else:
            password = _read_password(args.password_stdin)
            storage = args.storage or cfg.security.password_storage
            record = db.add(address, password, storage, _store_key(cfg))
    except DuplicateUser as e:
        raise CtlError(f"{e} already exists") from e
    finally:
        db.close()
    print(f"added {record.address} ({record.storage})")
    return 0


def _user_passwd(cfg: Config, args: argparse.Namespace) -> int:
    """Set a new password, in the user's storage class unless ``--storage`` converts it.

    ``--keep-password`` converts a ``des`` user without asking: the stored password is decrypted
    and stored again.  The other way round is impossible, a one-way hash cannot be reversed.
    """
    address = _address(args.address)
    db = _userdb(cfg)
    try:
        record = db.get(address)
        if record is None:
            raise CtlError(f"no such user: {address}")
        if record.storage == "directory":
            raise CtlError(f"{address} is a directory user: change the password in the directory")
        key = _store_key(cfg)
        if args.keep_password:
            if args.password_stdin:
                raise CtlError("--keep-password reads no password: drop --password-stdin")
            password = reversible_password(record, key)
            if password is None:
                raise CtlError(f"{address}: the password is stored one-way and cannot be kept; set a new one")
        else:
            password = _read_password(args.password_stdin)
        record = db.set_password(address, password, args.storage or record.storage, key)
    except NoSuchUser as e:
        raise CtlError(f"no such user: {e}") from e
    except InvalidToken as e:
        raise CtlError(f"{address}: the stored password does not decrypt with this store key") from e
    finally:
        db.close()
    print(f"password changed for {record.address} ({record.storage})")
    return 0


def _user_del(cfg: Config, args: argparse.Namespace) -> int:
    address = _address(args.address)
    db = _userdb(cfg)
    try:
        deleted = db.delete(address)
    finally:
        db.close()
    if not deleted:
        raise CtlError(f"no such user: {address}")
    print(f"deleted {address}")
    return 0


def _set_enabled(cfg: Config, args: argparse.Namespace, enabled: bool) -> int:
    address = _address(args.address)
    db = _userdb(cfg)
    try:
        db.set_enabled(address, enabled)
    except NoSuchUser as e:
        raise CtlError(f"no such user: {e}") from e
    finally:
        db.close()
    print(f"{'enabled' if enabled else 'disabled'} {address}")
    return 0


def _user_list(cfg: Config, args: argparse.Namespace) -> int:
    if args.directory:
        return _directory_users(cfg)
    db = _userdb(cfg)
    try:
        records = db.list()
    finally:
        db.close()
    width = max([len("ADDRESS"), *(len(r.address) for r in records)])
    print(f"{'ADDRESS':<{width}}  {'STORAGE':<9}  ENABLED")
    for r in records:
        print(f"{r.address:<{width}}  {r.storage:<9}  {'yes' if r.enabled else 'no'}")
    return 0


def _directory_client(cfg: Config) -> DirectoryClient:
    if cfg.directory is None:
        raise CtlError("no [directory] section in the configuration")
    try:
        return DirectoryClient(DirectorySettings.from_config(cfg.directory))
    except ValueError as e:
        raise CtlError(str(e)) from e


def _directory_users(cfg: Config) -> int:
    """``user list --directory``: address, account name and login state of every directory user."""
    client = _directory_client(cfg)
    rows = []
    try:
        for user, member in client.users():
            state = user.refusal or ("not in require_group" if member is False else "ok")
            rows.append((_shown(user.address or "-"), _shown(user.account), state))
    except TemporaryAuthFailure as e:
        raise CtlError(str(e)) from e
    width = max([len("ADDRESS"), *(len(r[0]) for r in rows)])
    account_width = max([len("ACCOUNT"), *(len(r[1]) for r in rows)])
    print(f"{'ADDRESS':<{width}}  {'ACCOUNT':<{account_width}}  STATE")
    for address, account, state in sorted(rows):
        print(f"{address:<{width}}  {account:<{account_width}}  {state}")
    return 0


def _directory_test(cfg: Config, args: argparse.Namespace) -> int:
    """``directory test USER``: each step of a directory login, stopping at the first that fails."""
    client = _directory_client(cfg)
    if args.password_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        try:
            password = getpass.getpass(f"Password of {args.user}: ")
        except (EOFError, KeyboardInterrupt) as e:
            raise CtlError("cancelled") from e
    if not password:
        raise CtlError("empty password refused (it would be an anonymous bind)")

    def step(name: str, detail: str) -> None:
        print(f"{name + ':':<14}{_shown(detail)}", file=sys.stderr if name == "FAILED" else sys.stdout)

    return 0 if client.diagnose(args.user, password, step) else 1


def _user_show(cfg: Config, args: argparse.Namespace) -> int:
    address = _address(args.address)
    db = _userdb(cfg)
    try:
        record = db.get(address)
    finally:
        db.close()
    if record is None:
        raise CtlError(f"no such user: {address}")
    print(f"address: {record.address}")
    print(f"storage: {record.storage}")
    print(f"scram:   {'yes' if record.scram else 'no'}")
    print(f"enabled: {'yes' if record.enabled else 'no'}")
    print(f"created: {_timestamp(record.created)}")
    print(f"changed: {_timestamp(record.changed)}")
    usable, unusable = usable_methods(
        cfg.security.methods,
        record.storage,
        record.scram is not None,
        cfg.security.allow_ntlm_for_directory_users,
    )
    print(f"methods: {', '.join(usable) or 'none'}")
    for method, reason in unusable:
        print(f"cannot use {method}: {reason}")
    return 0


def _check_config(cfg: Config, args: argparse.Namespace) -> int:
    print("configuration OK")
    for warning in config_warnings(cfg) + _user_warnings(cfg):
        print(f"warning: {warning}")
    problems = runtime_problems(cfg)
    for problem in problems:
        print(f"cannot start here: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _user_warnings(cfg: Config) -> list[str]:
    """`method_warnings` for the users already in the DB, one line per storage class that is short."""
    if not (cfg.store.path / "users.db").is_file():
        return []
    db = _userdb(cfg)
    try:
        records = db.list()
    finally:
        db.close()
    classes = Counter((r.storage, r.scram is not None) for r in records if r.storage != "directory")
    warnings = []
    for (storage, has_scram), count in sorted(classes.items()):
        who = f"{count} existing {storage} user{'s' if count != 1 else ''}"
        if not has_scram:
            who += " without SCRAM keys (set the password again; des: user passwd --keep-password)"
        warnings.extend(method_warnings(cfg.security.methods, storage, has_scram, who))
    return warnings


def _dev_setup(cfg: Config, args: argparse.Namespace) -> int:
    """What `make run` needs before the first start: the store (parents too) and a dev certificate."""
    cfg.store.path.mkdir(mode=0o750, parents=True, exist_ok=True)
    _store_key(cfg)
    if cfg.tls.certificate and cfg.tls.private_key:
        names = sorted({"localhost", cfg.server.hostname})
        if generate_dev_certificate(cfg.tls.certificate, cfg.tls.private_key, hostnames=names):
            where = ", ".join([*names, "127.0.0.1", "::1"])
            print(f"created a self-signed certificate for {where}: {cfg.tls.certificate}")
    print(f"store: {cfg.store.path}")
    for name, endpoint in cfg.listeners.items():
        print(f"{name:<11} {endpoint}")
    print(f"add a user:  .venv/bin/kmsctl --config {args.config} user add alice@{cfg.domains.local[0]}")
    return 0


def _lockout_db(cfg: Config) -> LockoutDB:
    return LockoutDB(_store_dir(cfg) / "lockout.db")


def _lockout_list(cfg: Config, args: argparse.Namespace) -> int:
    db = _lockout_db(cfg)
    try:
        now = time.time()
        locks = [lock for lock in db.locks() if lock.until > now]
    finally:
        db.close()
    width = max([len("ACCOUNT"), *(len(lock.account) for lock in locks)])
    ip_width = max([len("IP"), *(len(lock.ip) for lock in locks)])
    print(f"{'ACCOUNT':<{width}}  {'IP':<{ip_width}}  {'SINCE':<25}  UNTIL")
    for lock in locks:
        since, until = _timestamp(lock.since), _timestamp(lock.until)
        print(f"{lock.account:<{width}}  {lock.ip:<{ip_width}}  {since:<25}  {until}")
    return 0


def _lockout_unlock(cfg: Config, args: argparse.Namespace) -> int:
    account = None if args.account is None else account_name(args.account, cfg.domains.local[0])
    db = _lockout_db(cfg)
    try:
        removed = db.unlock(account)
    finally:
        db.close()
    logs = Logs(_store_dir(cfg) / "logs")
    try:
        for lock in removed:
            logs.security("lockout-unlocked", user=lock.account, ip=lock.ip, reason="kmsctl")
    finally:
        logs.close()
    if account is not None and not removed:
        print(f"{account} was not locked")
    for lock in removed:
        print(f"unlocked {lock.account} (locked by {lock.ip})")
    return 0


def _master_set_password(cfg: Config, args: argparse.Namespace) -> int:
    password = _read_password(args.password_stdin)
    store = _store_dir(cfg)
    master.save(store / "master.json", password, _store_key(cfg))
    logs = Logs(store / "logs")
    try:
        logs.security("master-password-set", reason="kmsctl")
    finally:
        logs.close()
    print("master password set")
    return 0


# --- kmsctl queue ------------------------------------------------------------------------------


def _queue_store(cfg: Config) -> QueueStore:
    """The outbound queue; what opening it repaired or moved aside is said on stderr."""
    root = _store_dir(cfg) / "queue"
    return QueueStore(root, report=lambda line: print(f"kmsctl: {line}", file=sys.stderr))


def _shown(text: str) -> str:
    """Queue contents (addresses, remote replies, message headers) are anybody's text: control and
    format characters are shown escaped so they cannot drive the administrator's terminal."""
    return "".join(
        c if c == "\t" or unicodedata.category(c) not in ("Cc", "Cf") else f"\\x{ord(c):02x}" for c in text
    )


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _size(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _queue_id(text: str) -> str:
    try:
        return check_id(text)
    except ValueError as e:
        raise CtlError(f"{e} (queue ids are letters and digits, as kmsctl queue list shows them)") from e


@contextmanager
def _locked_entry(store: QueueStore, entry_id: str) -> Iterator[QueueEntry]:
    """The entry, read again under its lock; a clear error when the server holds it or it is gone."""
    try:
        lock = store.try_lock(_queue_id(entry_id))
    except EntryBusy as e:
        raise CtlError(f"{entry_id} is being delivered or changed right now; try again in a moment") from e
    with lock:
        try:
            entry = store.get(entry_id)
        except NoSuchEntry as e:
            raise CtlError(f"no such queue entry: {entry_id}") from e
        except DamagedEntry as e:
            raise CtlError(f"queue entry {entry_id} is damaged: {e}") from e
        yield entry


def _queue_log(cfg: Config, event: str, entry: QueueEntry, **fields: object) -> None:
    logs = Logs(_store_dir(cfg) / "logs")
    try:
        logs.mail(event, None, id=entry.id, sender=entry.sender, reason="kmsctl", **fields)
    finally:
        logs.close()


def _queue_list(cfg: Config, args: argparse.Namespace) -> int:
    entries = _queue_store(cfg).entries()
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=1))
        return 0
    now = time.time()
    print(f"{'ID':<18}  {'AGE':>6}  {'SIZE':>6}  {'NEXT ATTEMPT (UTC)':<25}  SENDER")
    for e in sorted(entries, key=lambda e: e.created):
        when = "now" if e.next_attempt <= now else _timestamp(e.next_attempt)
        sender = _shown(e.sender) or "<>"
        print(f"{e.id:<18}  {_age(now - e.created):>6}  {_size(e.size):>6}  {when:<25}  {sender}")
        for r in e.pending():
            reply = f"  {_shown(r.last_reply)}" if r.last_reply else ""
            print(f"    {_shown(r.address)}  (attempts {r.attempts}){reply}")
        if not e.pending():
            print("    nothing pending: reports to send or removal due at the next queue run")
    pending = sum(len(e.pending()) for e in entries)
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {pending} recipient(s) pending")
    return 0


def _body_header(store: QueueStore, entry_id: str, limit: int = 1 << 16) -> str:
    """The header section of the queued body (at most ``limit`` bytes of it)."""
    with open(store.body_path(entry_id), "rb") as f:
        data = f.read(limit)
    end = data.find(b"\n\n")
    head = data if end < 0 else data[: end + 1]
    return head.decode("utf-8", "replace")


def _queue_show(cfg: Config, args: argparse.Namespace) -> int:
    store = _queue_store(cfg)
    entry_id = _queue_id(args.id)
    try:
        entry = store.get(entry_id)
        header = _body_header(store, entry_id)
    except (NoSuchEntry, FileNotFoundError) as e:
        raise CtlError(f"no such queue entry: {entry_id}") from e
    except DamagedEntry as e:
        raise CtlError(f"queue entry {entry_id} is damaged: {e}") from e
    if args.json:
        print(json.dumps({**asdict(entry), "header": header}, indent=1))
        return 0
    now = time.time()
    print(f"id:            {entry.id}")
    print(f"sender:        <{_shown(entry.sender)}>")
    print(f"created:       {_timestamp(entry.created)} ({_age(now - entry.created)} ago)")
    print(f"next attempt:  {'now' if entry.next_attempt <= now else _timestamp(entry.next_attempt)}")
    print(f"attempts:      {entry.attempts}")
    print(f"size:          {entry.size} bytes")
    print(f"client:        {_shown(entry.client) or '-'}")
    params = [f"RET={entry.ret}" if entry.ret else "", f"ENVID={_shown(entry.envid)}" if entry.envid else ""]
    params += ["BODY=8BITMIME" if entry.body_8bit else "", "SMTPUTF8" if entry.smtputf8 else ""]
    print(f"parameters:    {' '.join(p for p in params if p) or '-'}")
    print(f"delay warned:  {'yes' if entry.delay_warned else 'no'}")
    print("recipients:")
    for r in entry.recipients:
        status = f", status {r.status}" if r.status else ""
        print(f"  {_shown(r.address)}: {r.state}, {r.attempts} attempt(s){status}")
        if r.last_reply:
            print(f"    last reply:   {_shown(r.last_reply)}")
        if r.remote_mta:
            print(f"    remote host:  {_shown(r.remote_mta)}")
        if r.last_attempt is not None:
            print(f"    last attempt: {_timestamp(r.last_attempt)}")
        dsn = [f"NOTIFY={','.join(r.notify)}" if r.notify else ""]
        dsn.append(f"ORCPT={_shown(r.orcpt)}" if r.orcpt else "")
        if any(dsn):
            print(f"    dsn:          {' '.join(d for d in dsn if d)}")
        if r.state != PENDING and r.dsn_sent:
            print("    report:       sent")
    print("header:")
    for line in header.splitlines():
        print(f"  {_shown(line)}")
    return 0


def _queue_flush(cfg: Config, args: argparse.Namespace) -> int:
    """next_attempt = now for one entry or all, and the marker that makes a running server scan now."""
    store = _queue_store(cfg)
    now = time.time()
    if args.id:
        with _locked_entry(store, args.id) as entry:
            entry.next_attempt = now
            store.save(entry)
        store.request_flush()
        print(f"flushed {entry.id}")
        return 0
    flushed, busy = 0, []
    for entry_id in [e.id for e in store.entries()]:
        try:
            lock = store.try_lock(entry_id)
        except EntryBusy:
            busy.append(entry_id)
            continue
        with lock:
            try:
                entry = store.get(entry_id)
            except (NoSuchEntry, DamagedEntry):
                continue  # delivered (or moved aside) since the listing
            entry.next_attempt = now
            store.save(entry)
            flushed += 1
    store.request_flush()
    for entry_id in busy:
        print(f"kmsctl: {entry_id} is being delivered or changed right now; not flushed", file=sys.stderr)
    print(f"flushed {flushed} entr{'y' if flushed == 1 else 'ies'}")
    return 1 if busy else 0


def _queue_delete(cfg: Config, args: argparse.Namespace) -> int:
    store = _queue_store(cfg)
    with _locked_entry(store, args.id) as entry:
        store.remove(entry.id)
    pending = len(entry.pending())
    _queue_log(cfg, "queue-deleted", entry, pending=pending)
    print(f"deleted {entry.id} ({pending} recipient(s) were pending; no report is sent)")
    return 0


def _queue_bounce(cfg: Config, args: argparse.Namespace) -> int:
    """Fail every pending recipient now; the runner sends the DSN (it owns sending mail)."""
    store = _queue_store(cfg)
    now = time.time()
    with _locked_entry(store, args.id) as entry:
        pending = entry.pending()
        if not pending:
            raise CtlError(f"{entry.id} has no pending recipients")
        for r in pending:
            schedule.apply_admin_bounce(r, now)
        entry.next_attempt = now
        store.save(entry)
    store.request_flush()
    _queue_log(cfg, "queue-bounced", entry, recipients=len(pending))
    if schedule.unreported_failures(entry):
        after = f"the server sends the report to <{_shown(entry.sender)}> at its next queue run"
    else:
        after = "no report is sent (null sender, or NOTIFY asked for none)"
    print(f"bounced {len(pending)} recipient(s) of {entry.id}; {after}")
    return 0


def _space_warning(cfg: Config) -> None:
    """SPEC §8: every run says so on stderr while the store is below its soft limit (same exit code)."""
    store = cfg.store
    try:
        free = space.disk_usage(store.path).free
    except OSError:
        return  # the verb that needs the store reports it
    state = space.space_state(free, store.soft_limit, store.hard_limit)
    if state != space.OK:
        hard = state == space.HARD
        limit = store.hard_limit if hard else store.soft_limit
        text = space.limit_message(store.path, free, limit, hard, store.hard_limit_action)
        print(f"kmsctl: warning: {text}", file=sys.stderr)


def _store_status(cfg: Config, args: argparse.Namespace) -> int:
    store = cfg.store
    usage = space.disk_usage(store.path)
    mount = space.filesystem_of(store.path)
    size = space.format_size
    print(f"path:       {store.path}")
    print(f"filesystem: {f'{mount.source} on {mount.point} ({mount.fstype})' if mount else 'unknown'}")
    print(f"free:       {size(usage.free)} of {size(usage.total)} ({usage.free} of {usage.total} bytes)")
    print(f"soft_limit: {size(store.soft_limit)}")
    print(f"hard_limit: {size(store.hard_limit)} (hard_limit_action = {store.hard_limit_action})")
    print(f"state:      {space.space_state(usage.free, store.soft_limit, store.hard_limit)}")
    for label, name in (("mailboxes", "mail"), ("queue", "queue"), ("logs", "logs")):
        used = space.tree_size(store.path / name)
        print(f"{label + ':':<11} {'absent' if used is None else size(used)} ({store.path / name})")
    return 0


def _update_check(cfg: Config, args: argparse.Namespace) -> int:
    """Check now (also with ``check = false``: that only stops the periodic checks); exit 1 on failure."""
    if not cfg.update.feed_url:
        raise CtlError("update.feed_url is empty: there is nothing to check")
    logs = Logs(_store_dir(cfg) / "logs", cfg.logs.debug)
    try:
        state = updatechecker.check_now(cfg, logs)
    finally:
        logs.close()
    if state.error is not None:
        raise CtlError(f"update check failed: {state.error}")
    print(updates.summary(state, __version__))
    return 0


def _update_status(cfg: Config, args: argparse.Namespace) -> int:
    state = updatechecker.read_state(cfg.store.path / updatechecker.STATE_FILE)
    for line in updates.status_lines(state, __version__, time.time()):
        print(line)
    if not cfg.update.feed_url:
        print("periodic checks:  off (update.feed_url is empty)")
    else:
        every = f"every {cfg.update.interval:g}s" if cfg.update.check else "off (update.check = false)"
        print(f"periodic checks:  {every}, {cfg.update.feed_url}")
    return 0


Command = Callable[[Config, argparse.Namespace], int]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmsctl", description="Administer a kms mail server.")
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file (default: {DEFAULT_CONFIG})"
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    check = verbs.add_parser(
        "check-config",
        help="validate the configuration",
        description="Print every problem of the configuration file (exit 1), or 'configuration OK' with "
        "warnings; exit 1 as well when the server could not start on this machine.",
    )
    check.set_defaults(func=_check_config)

    dev = verbs.add_parser(
        "dev-setup",
        help="create the store and a development certificate",
        description="Create the store folder (with parents) and, if missing, a self-signed certificate "
        "for localhost at the [tls] paths; print the listeners. Used by `make run`.",
    )
    dev.set_defaults(func=_dev_setup)

    user = verbs.add_parser("user", help="manage local users", description="Manage users of the user DB.")
    user_verbs = user.add_subparsers(dest="user_verb", required=True, metavar="ACTION")

    def address_verb(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        p = user_verbs.add_parser(name, help=help, description=help)
        p.add_argument("address", metavar="ADDRESS", help="the user's address, local@domain")
        p.set_defaults(func=func)
        return p

    def password_options(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input instead of asking twice",
        )
        p.add_argument(
            "--storage",
            choices=("des", "sha"),
            help="des: reversible, every method; sha: one-way, plaintext methods and SCRAM-SHA-256 "
            f"only (default: {default})",
        )

    add = address_verb("add", _user_add, "create a user")
    password_options(add, "security.password_storage")
    add.add_argument(
        "--source",
        choices=("local", "directory"),
        default="local",
        help="directory: the user logs in with the Active Directory password (no local one)",
    )
    passwd = address_verb("passwd", _user_passwd, "set a user's password, or convert its storage class")
    password_options(passwd, "the user's current storage")
    passwd.add_argument(
        "--keep-password",
        action="store_true",
        help="keep the current password (des users only), e.g. to convert with --storage sha",
    )
    address_verb("del", _user_del, "delete a user from the user DB")
    address_verb("show", _user_show, "show a user and the login methods it can use (never the password)")
    address_verb("enable", lambda c, a: _set_enabled(c, a, True), "allow a disabled user to log in again")
    address_verb("disable", lambda c, a: _set_enabled(c, a, False), "refuse every login of a user")
    lst = user_verbs.add_parser("list", help="list users", description="List address, storage, enabled.")
    lst.add_argument(
        "--directory",
        action="store_true",
        help="list the users of [directory] instead: address, sAMAccountName and login state",
    )
    lst.set_defaults(func=_user_list)

    directory_parser = verbs.add_parser(
        "directory", help="Active Directory diagnostics", description="The [directory] (SPEC §2, §3)."
    )
    directory_verbs = directory_parser.add_subparsers(dest="directory_verb", required=True, metavar="ACTION")
    dtest = directory_verbs.add_parser(
        "test",
        help="try a directory login step by step",
        description="Connect, TLS, service bind, search, user bind, account state, groups: each step is "
        "printed as it passes; exit 1 at the first that fails, with the reason.",
    )
    dtest.add_argument(
        "user", metavar="USER", help="alice, alice@<mail_domain>, alice@<realm> or DOMAIN\\alice"
    )
    dtest.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    dtest.set_defaults(func=_directory_test)

    lockout = verbs.add_parser(
        "lockout", help="list and unlock locked accounts", description="Account lockout (SPEC §6)."
    )
    lockout_verbs = lockout.add_subparsers(dest="lockout_verb", required=True, metavar="ACTION")
    llist = lockout_verbs.add_parser(
        "list", help="list locked accounts", description="List account, locking IP, since and until (UTC)."
    )
    llist.set_defaults(func=_lockout_list)
    unlock = lockout_verbs.add_parser(
        "unlock", help="unlock one account", description="Unlock an account now and reset its counters."
    )
    unlock.add_argument(
        "account", metavar="NAME", help="the account, local@domain (or local: default domain)"
    )
    unlock.set_defaults(func=_lockout_unlock)
    unlock_all = lockout_verbs.add_parser(
        "unlock-all",
        help="unlock every account now",
        description="Unlock every account and reset all counters.",
    )
    unlock_all.set_defaults(func=_lockout_unlock, account=None)

    master_parser = verbs.add_parser(
        "master", help="master authentication", description="Master authentication (SPEC §7)."
    )
    master_verbs = master_parser.add_subparsers(dest="master_verb", required=True, metavar="ACTION")
    set_password = master_verbs.add_parser(
        "set-password",
        help="set the master password",
        description="Set the master password: stored hashed (PBKDF2) and, for IMAP X-MASTERAUTH, "
        "encrypted with the store key.",
    )
    set_password.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input instead of asking twice",
    )
    set_password.set_defaults(func=_master_set_password)

    queue = verbs.add_parser(
        "queue",
        help="the outbound mail queue",
        description="List, inspect, retry now, delete or bounce queued outbound messages. Works while "
        "the server runs: an entry being delivered at that moment is refused (exit 1), try again.",
    )
    queue_verbs = queue.add_subparsers(dest="queue_verb", required=True, metavar="ACTION")
    qlist = queue_verbs.add_parser(
        "list",
        help="list queued messages",
        description="ID, age, size, next attempt (UTC) and sender of each message, then its pending "
        "recipients with their attempts and last reply.",
    )
    qlist.add_argument("--json", action="store_true", help="every envelope field, as JSON")
    qlist.set_defaults(func=_queue_list)
    qshow = queue_verbs.add_parser(
        "show",
        help="show one message",
        description="The envelope, the state of every recipient and the header of the queued message.",
    )
    qshow.add_argument("id", metavar="ID")
    qshow.add_argument("--json", action="store_true", help="every envelope field and the header, as JSON")
    qshow.set_defaults(func=_queue_show)
    qflush = queue_verbs.add_parser(
        "flush",
        help="retry now",
        description="Make one message (or all) due now; a running server tries it within seconds.",
    )
    qflush.add_argument("id", metavar="ID", nargs="?", help="one message (default: all)")
    qflush.set_defaults(func=_queue_flush)
    qdelete = queue_verbs.add_parser(
        "delete", help="remove a message", description="Remove a message from the queue; no report is sent."
    )
    qdelete.add_argument("id", metavar="ID")
    qdelete.set_defaults(func=_queue_delete)
    qbounce = queue_verbs.add_parser(
        "bounce",
        help="fail a message now",
        description='Fail every pending recipient now ("5.0.0 bounced by the administrator"); the server '
        "sends the sender a delivery status notification as for any other failure.",
    )
    qbounce.add_argument("id", metavar="ID")
    qbounce.set_defaults(func=_queue_bounce)

    store_parser = verbs.add_parser(
        "store", help="the store directory", description="The store directory (SPEC §8)."
    )
    store_verbs = store_parser.add_subparsers(dest="store_verb", required=True, metavar="ACTION")
    status = store_verbs.add_parser(
        "status",
        help="free space, limits and usage",
        description="Path, file system, free and total space, the soft and hard limits, the state "
        "(ok: above both; soft: below soft_limit; hard: below hard_limit, new mail refused or the "
        "server stopped), and the disk usage of mailboxes, queue and logs.",
    )
    status.set_defaults(func=_store_status)

    update_parser = verbs.add_parser(
        "update", help="check for a newer kms", description="Update checks (SPEC §11); nothing is installed."
    )
    update_verbs = update_parser.add_subparsers(dest="update_verb", required=True, metavar="ACTION")
    update_verbs.add_parser(
        "check",
        help="check the release feed now",
        description="Fetch update.feed_url now (through [proxy] when set), print the outcome and save it "
        "in <store>/update.json; exit 1 with the reason when the check fails.",
    ).set_defaults(func=_update_check)
    update_verbs.add_parser(
        "status",
        help="show the last check",
        description="Current version, newest available, whether it is a pre-release, the time since "
        "the last check and its error, from <store>/update.json (no network).",
    ).set_defaults(func=_update_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one kmsctl command; the exit status (0 success, 1 failure, 2 bad usage)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    func: Command = args.func
    _space_warning(cfg)
    try:
        return func(cfg, args)
    except CtlError as e:
        print(f"kmsctl: {e}", file=sys.stderr)
    except StoreKeyError as e:
        print(f"kmsctl: store key: {e}", file=sys.stderr)
    except sqlite3.Error as e:
        print(f"kmsctl: database: {e}", file=sys.stderr)
    except OSError as e:
        print(f"kmsctl: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
