"""The update checker (SPEC §11): fetch the feed now and then, keep the result, never take the server down.

`Checker.check` is one check, shared by the server and ``kmsctl update check``: read the proxy
password and CA file, fetch ``[update] feed_url`` (`kms.httpfetch`), compare (`kms.updates`), write
``<store>/update.json`` atomically and log: the result in debug.log (``update_checker``), a failure
in error.log.  Every failure, expected or not, becomes a failed check with its reason; the last
known result survives it.  `UpdateChecker` is the service that runs a check shortly after start and
then every ``interval``.  Disk work goes through ``run_blocking`` (the store's thread pool in the
server; a direct call in kmsctl, whose reactor serves nobody else).
"""

from __future__ import annotations

import functools
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from kms import __version__
from kms.config import Config, ProxyConfig, UpdateConfig
from kms.dns import make_resolver
from kms.fsutil import replace_file
from kms.httpfetch import FetchError, Proxy, fetch
from kms.logs import Logs
from kms.updates import (
    MAX_FEED_SIZE,
    FeedError,
    UpdateState,
    after_failure,
    after_success,
    parse_feed,
    state_from_json,
    state_to_json,
)

STATE_FILE = "update.json"
FIRST_CHECK_DELAY = 60.0  # after start: the server is up and listening before it looks outside
USER_AGENT = f"kms-update-check/{__version__}"
_MAX_SMALL_FILE = 1 << 20  # CA bundle, password file, update.json

log = Logger()

RunBlocking = Callable[..., Deferred[Any]]


class CheckInputError(Exception):
    """A file the check needs (proxy password, CA bundle) cannot be used."""


@dataclass(frozen=True)
class Inputs:
    """What one check reads from disk before it goes out."""

    proxy: Proxy | None
    ca_pem: bytes | None
    warnings: list[str] = field(default_factory=list)


def _read_small(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_SMALL_FILE + 1)
    except OSError as e:
        raise CheckInputError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    if len(data) > _MAX_SMALL_FILE:
        raise CheckInputError(f"{what}: {path} is larger than {_MAX_SMALL_FILE} bytes")
    return data


def read_inputs(update: UpdateConfig, proxy: ProxyConfig | None) -> Inputs:
    """Blocking: the proxy credentials (password file expected 0600) and the CA file, read at each check."""
    warnings = []
    settings = None
    if proxy is not None:
        password = ""
        if proxy.password_file is not None:
            path = proxy.password_file
            raw = _read_small(path, "proxy.password_file")
            password = raw.decode("utf-8", "replace").split("\n", 1)[0].removesuffix("\r")
            try:
                mode = stat.S_IMODE(path.stat().st_mode)
            except OSError as e:
                raise CheckInputError(f"proxy.password_file: cannot read {path}: {e.strerror or e}") from None
            if mode & 0o077:
                problem = f"is open to group or others (mode {mode:o}; use 0600)"
                warnings.append(f"proxy.password_file {path} {problem}")
        settings = Proxy(proxy.address, proxy.port, proxy.username, password)
    ca_pem = _read_small(update.ca_file, "update.ca_file") if update.ca_file is not None else None
    return Inputs(settings, ca_pem, warnings)


def write_state(path: Path, state: UpdateState) -> None:
    """Blocking: replace ``path`` atomically (temporary file, fsync, rename), so readers see whole states."""
    replace_file(path, state_to_json(state), 0o640)


def read_state(path: Path) -> UpdateState | None:
    """Blocking: the last saved state, None when there is none or it is damaged (then it is rewritten)."""
    try:
        return state_from_json(_read_small(path, STATE_FILE))
    except CheckInputError:
        return None


class Checker:
    """An update check, for the server's service and for kmsctl.

    ``resolver_factory`` (`kms.dns.make_resolver` with ``[dns]``) is called once, at the first host
    name to look up: feeds and proxies given by IP address never create a resolver.
    """

    def __init__(
        self,
        update: UpdateConfig,
        proxy: ProxyConfig | None,
        state_path: Path,
        logs: Logs,
        reactor: Any,
        resolver_factory: Callable[[], Any],
        run_blocking: RunBlocking,
        current: str = __version__,
    ) -> None:
        self._update = update
        self._proxy = proxy
        self.state_path = state_path
        self._logs = logs
        self._reactor = reactor
        self._resolver = functools.cache(resolver_factory)  # one resolver, made at the first name
        self._run_blocking = run_blocking
        self._current = current

    async def check(self) -> UpdateState:
        """Check now; the new state (a failed check is a state with ``error``).  Only cancelling raises."""
        now = self._reactor.seconds()
        previous = None
        beta = self._update.beta
        via = "direct" if self._proxy is None else f"proxy {self._proxy.address}:{self._proxy.port}"
        try:
            previous = await self._run_blocking(read_state, self.state_path)
            inputs: Inputs = await self._run_blocking(read_inputs, self._update, self._proxy)
            for warning in inputs.warnings:
                self._logs.error("update-check-warning", problem=warning)
            body = await fetch(
                self._update.feed_url,
                reactor=self._reactor,
                resolver_factory=self._resolver,
                proxy=inputs.proxy,
                ca_pem=inputs.ca_pem,
                timeout=self._update.timeout,
                max_size=MAX_FEED_SIZE,
                user_agent=USER_AGENT,
            )
            result = parse_feed(body, self._current, beta)
        except defer.CancelledError:
            raise
        except (CheckInputError, FetchError, FeedError) as e:
            state = after_failure(previous, now, self._current, beta, str(e))
        except Exception as e:  # a bug must cost one check, not the server
            log.failure("update check")
            state = after_failure(previous, now, self._current, beta, f"internal error: {type(e).__name__}")
        else:
            state = after_success(now, self._current, beta, result)
        url = self._update.feed_url
        if state.error is None:
            self._logs.debug(
                "update_checker",
                "checked",
                url=url,
                via=via,
                current=state.current,
                newest=state.newest or "-",
                newer=state.newer,
                prerelease=state.prerelease,
                beta=beta,
            )
        else:
            self._logs.error("update-check-failed", url=url, via=via, error=state.error)
            self._logs.debug("update_checker", "failed", url=url, via=via, error=state.error)
        try:
            await self._run_blocking(write_state, self.state_path, state)
        except OSError as e:
            self._logs.error("update-state-not-saved", path=str(self.state_path), error=str(e))
        return state


class UpdateChecker(Service):
    """Checks ``FIRST_CHECK_DELAY`` after start, then ``interval`` after each check ends."""

    name = "update-checker"

    def __init__(
        self, checker: Checker, clock: Any, interval: float, first_delay: float = FIRST_CHECK_DELAY
    ) -> None:
        self._checker = checker
        self._clock = clock
        self._interval = interval
        self._first_delay = first_delay
        self._call: Any = None
        self._running: Deferred[UpdateState] | None = None

    def startService(self) -> None:
        super().startService()
        self._call = self._clock.callLater(self._first_delay, self._run)

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._running is not None:
            self._running.cancel()

    def _run(self) -> None:
        self._call = None
        running = self._running = Deferred.fromCoroutine(self._checker.check())
        running.addBoth(self._next)

    def _next(self, outcome: object) -> None:
        """Schedule the next check; ``check`` raises only when cancelled, anything else is a bug to log."""
        self._running = None
        if isinstance(outcome, Failure) and not outcome.check(defer.CancelledError):
            log.failure("update checker", outcome)
        if self.running:
            self._call = self._clock.callLater(self._interval, self._run)


def check_now(cfg: Config, logs: Logs) -> UpdateState:
    """kmsctl: one check on the global reactor, run until the check ends (short-lived processes only)."""
    from twisted.internet import reactor

    checker = Checker(
        cfg.update,
        cfg.proxy,
        cfg.store.path / STATE_FILE,
        logs,
        reactor,
        functools.partial(make_resolver, cfg.dns, reactor),
        defer.maybeDeferred,
    )
    outcome: list[UpdateState | Failure] = []

    def run() -> None:
        d = Deferred.fromCoroutine(checker.check())
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(run)  # type: ignore[attr-defined]
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[return-value]
