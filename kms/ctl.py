"""kmsctl: the administrator's command line (SPEC §1, §3).

It works on the store directly (the user DB is SQLite in WAL mode), so it runs whether or not the
server does.  Run it as the user the server runs as: files it creates (``users.db``, ``store.key``)
are private to their owner.  Passwords come from the terminal, asked twice, or from one line of
standard input with ``--password-stdin``; never from the command line, where ``ps`` would show them.
"""

from __future__ import annotations

import argparse
import getpass
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from kms.auth import master
from kms.auth.lockout import LockoutDB, account_name
from kms.auth.matrix import method_warnings, usable_methods
from kms.auth.passwords import InvalidToken, StoreKey, StoreKeyError
from kms.config import Config, ConfigError, config_warnings, load_config, runtime_problems
from kms.logs import Logs
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
    lst.set_defaults(func=_user_list)

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
