"""Update checks, the pure part (SPEC §11): read a release feed, pick the newest version, keep the state.

The feed has the shape of a package index's JSON API (PyPI's ``/pypi/NAME/json``)::

    {"info": {"version": "1.2.0"}, "releases": {"1.2.0": [{"yanked": false, ...}], "1.3.0b1": [...]}}

It comes from the network, so everything in it is treated as hostile: the document may be garbage,
of the wrong types, deeply nested or full of invalid version strings.  Versions are compared by
``packaging.version`` (PEP 440, the implementation pip uses), never as strings: ``1.10`` is newer
than ``1.9`` and ``1.3.0b1`` is older than ``1.3.0``.  The last result is kept in
``<store>/update.json`` (`UpdateState`), shared by the server and ``kmsctl update``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from packaging.version import InvalidVersion, Version

MAX_FEED_SIZE = 5 * 2**20
MAX_VERSION_LENGTH = 64  # longer strings are no version anyone publishes; spare the parser


class FeedError(ValueError):
    """The feed cannot be used; the message says why, fit for a log line."""


@dataclass(frozen=True)
class FeedResult:
    """The newest release the admin may want (None: none qualifies) and how it compares to ours."""

    newest: str | None
    newer: bool
    prerelease: bool


def _version(text: object) -> Version | None:
    if not isinstance(text, str) or len(text) > MAX_VERSION_LENGTH:
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _yanked(files: object) -> bool:
    """A release is yanked when it has files and every one of them says ``"yanked": true``."""
    return (
        isinstance(files, list)
        and bool(files)
        and all(isinstance(f, dict) and f.get("yanked") is True for f in files)
    )


def _candidates(document: dict[str, Any]) -> Iterator[Version]:
    """Every valid, not yanked version the feed names: the keys of ``releases`` and ``info.version``."""
    releases = document.get("releases")
    if releases is not None and not isinstance(releases, dict):
        raise FeedError("feed: releases is not an object")
    releases = releases or {}
    for name, files in releases.items():
        version = _version(name)
        if version is not None and not _yanked(files):
            yield version
    info = document.get("info")
    if info is not None and not isinstance(info, dict):
        raise FeedError("feed: info is not an object")
    name = (info or {}).get("version")
    version = _version(name)
    if version is not None and not _yanked(releases.get(name)):
        yield version


def parse_feed(data: bytes, current: str, beta: bool) -> FeedResult:
    """The newest release in ``data`` compared with ``current``; pre-releases count only with ``beta``.

    FeedError for a document that is too large, not JSON, not shaped like a feed, or without a
    single valid version.  Entries that are merely odd (invalid versions, files of the wrong type)
    are skipped, so one bad release does not hide the good ones.
    """
    if len(data) > MAX_FEED_SIZE:
        raise FeedError(f"feed: larger than {MAX_FEED_SIZE} bytes")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise FeedError(f"feed: not valid JSON ({type(e).__name__})") from None
    if not isinstance(document, dict):
        raise FeedError("feed: not a JSON object")
    versions = list(_candidates(document))
    if not versions:
        raise FeedError("feed: no valid version")
    eligible = [v for v in versions if beta or not v.is_prerelease]
    if not eligible:
        return FeedResult(newest=None, newer=False, prerelease=False)
    newest = max(eligible)
    return FeedResult(newest=str(newest), newer=newest > Version(current), prerelease=newest.is_prerelease)


@dataclass(frozen=True)
class UpdateState:
    """What ``update.json`` keeps: the last check (success or not) and the last known result."""

    checked_at: float
    current: str
    beta: bool
    newest: str | None = None
    newer: bool = False
    prerelease: bool = False
    succeeded_at: float | None = None
    error: str | None = None


def after_success(when: float, current: str, beta: bool, result: FeedResult) -> UpdateState:
    return UpdateState(
        checked_at=when,
        current=current,
        beta=beta,
        newest=result.newest,
        newer=result.newer,
        prerelease=result.prerelease,
        succeeded_at=when,
    )


def after_failure(
    previous: UpdateState | None, when: float, current: str, beta: bool, error: str
) -> UpdateState:
    """A failed check keeps the last known result, so one outage does not hide a pending update."""
    if previous is None:
        return UpdateState(checked_at=when, current=current, beta=beta, error=error)
    return replace(previous, checked_at=when, current=current, beta=beta, error=error)


def state_to_json(state: UpdateState) -> bytes:
    return json.dumps(asdict(state), indent=1, sort_keys=True).encode() + b"\n"


def state_from_json(data: bytes) -> UpdateState | None:
    """The state in ``data``, or None when it is missing pieces or damaged (then it is rewritten)."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    kinds: dict[str, tuple[type, ...]] = {
        "checked_at": (int, float),
        "current": (str,),
        "beta": (bool,),
        "newest": (str, type(None)),
        "newer": (bool,),
        "prerelease": (bool,),
        "succeeded_at": (int, float, type(None)),
        "error": (str, type(None)),
    }
    for key, kind in kinds.items():
        value = raw.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kind):
            return None
    return UpdateState(**{key: raw[key] for key in kinds})


def _ago(seconds: float) -> str:
    """``3d 4h ago``: two units are enough to see whether checks run."""
    seconds = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return " ".join(parts) + " ago"


def _when(t: float, now: float) -> str:
    stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
    return f"{stamp} ({_ago(now - t)})"


def status_lines(state: UpdateState | None, current: str, now: float) -> list[str]:
    """What ``kmsctl update status`` prints: versions, whether the newest is a beta, age, last error."""
    lines = [f"current version:  {current}"]
    if state is None:
        return [*lines, "last check:       never"]
    if state.succeeded_at is None:
        lines.append("newest available: unknown (no check has succeeded)")
    elif state.newest is None:
        lines.append("newest available: none (the feed has only pre-releases; beta is off)")
    else:
        newest = _version(state.newest)
        verdict = "newer, an update is available" if newest and newest > Version(current) else "not newer"
        lines.append(f"newest available: {state.newest} ({verdict})")
        lines.append(f"beta:             {'yes, a pre-release' if state.prerelease else 'no'}")
    lines.append(f"pre-releases:     {'included' if state.beta else 'not included'} (update.beta)")
    lines.append(f"last check:       {_when(state.checked_at, now)}")
    if state.succeeded_at is not None and state.succeeded_at != state.checked_at:
        lines.append(f"last success:     {_when(state.succeeded_at, now)}")
    lines.append(f"last error:       {state.error or 'none'}")
    return lines


def summary(state: UpdateState, current: str) -> str:
    """One line for ``kmsctl update check``: is there something to install?"""
    if state.error is not None:
        return f"kms {current}: the check failed: {state.error}"
    newest = _version(state.newest)
    if newest is None:
        return f"kms {current}: no release to compare with (the feed has only pre-releases; beta is off)"
    if newest > Version(current):
        kind = "a pre-release" if state.prerelease else "a release"
        return f"kms {current}: {state.newest} is available ({kind})"
    return f"kms {current} is up to date (newest: {state.newest})"
