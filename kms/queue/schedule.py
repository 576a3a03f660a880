"""What happens to a queued message next: retry times, expiry, delay warnings, per-recipient outcomes.

Decisions only, no I/O and no clock (the caller passes ``now``), so the runner's rules are tested
with plain numbers.  The ``apply_*`` functions and `expire` update the recipient in place (the
runner holds it in its entry) and never touch one whose state is already final, so a late or
repeated answer cannot turn a delivered recipient into a bounced one.

NOTIFY (RFC 3461 §4.1): empty means none was given, which we treat as FAILURE,DELAY; NEVER means no
report at all.  A message with the null sender (a DSN itself) is never answered with a DSN.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kms.queue.interfaces import (
    BOUNCED,
    DELIVERED,
    PENDING,
    DestinationError,
    HostFailure,
    QueuedRecipient,
    QueueEntry,
    Reply,
)

MAX_REPLY = 1000  # a remote reply is hostile text: bounded before it reaches the envelope and the DSN
MAX_HOST = 300

ADMIN_BOUNCE_STATUS = "5.0.0"
ADMIN_BOUNCE_TEXT = "bounced by the administrator"

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def next_attempt(
    entry_or_attempts: QueueEntry | int, now: float, schedule: Sequence[float], *, until: float | None = None
) -> float:
    """When to try again after ``attempts`` failed rounds: ``schedule[0]`` after the first, then the
    next step each time, the last step repeating (5 min, 15 min, 30 min, then hourly).

    No failed round yet means now.  ``until`` (the expiry time) caps the result, so that a message
    is bounced when its lifetime ends rather than at the next hourly retry after it.
    """
    if not schedule:
        raise ValueError("empty retry schedule")
    attempts = entry_or_attempts.attempts if isinstance(entry_or_attempts, QueueEntry) else entry_or_attempts
    when = now if attempts <= 0 else now + schedule[min(attempts, len(schedule)) - 1]
    if until is not None:
        when = max(now, min(when, until))
    return when


def expired(entry: QueueEntry, now: float, lifetime: float) -> bool:
    """The message has been in the queue for ``lifetime`` seconds: its pending recipients bounce."""
    return now >= entry.created + lifetime


def wants_failure_dsn(recipient: QueuedRecipient) -> bool:
    """NOTIFY absent or naming FAILURE (NEVER and a bare SUCCESS/DELAY say no)."""
    return "NEVER" not in recipient.notify and (not recipient.notify or "FAILURE" in recipient.notify)


def wants_delay_dsn(recipient: QueuedRecipient) -> bool:
    """NOTIFY absent or naming DELAY."""
    return "NEVER" not in recipient.notify and (not recipient.notify or "DELAY" in recipient.notify)


def wants_success_dsn(recipient: QueuedRecipient) -> bool:
    """Only an explicit NOTIFY=SUCCESS asks for a report of a successful delivery."""
    return "SUCCESS" in recipient.notify and "NEVER" not in recipient.notify


def needs_failure_dsn(entry: QueueEntry, recipient: QueuedRecipient) -> bool:
    """This bounced recipient's failure DSN is still to be sent (never for the null sender)."""
    if not entry.sender or recipient.state != BOUNCED or recipient.dsn_sent:
        return False
    return wants_failure_dsn(recipient)


def unreported_failures(entry: QueueEntry) -> list[QueuedRecipient]:
    """The recipients a failure DSN must name now."""
    return [r for r in entry.recipients if needs_failure_dsn(entry, r)]


def finished(entry: QueueEntry) -> bool:
    """Nothing left to deliver and no failure left to report: the entry can be removed."""
    return not entry.pending() and not unreported_failures(entry)


def delay_recipients(entry: QueueEntry) -> list[QueuedRecipient]:
    """Pending recipients a delay warning would name (none for the null sender)."""
    if not entry.sender:
        return []
    return [r for r in entry.pending() if wants_delay_dsn(r)]


def needs_delay_warning(entry: QueueEntry, now: float, delay_warning: float) -> bool:
    """Send the one delay warning now?  After ``delay_warning`` seconds (0 turns warnings off), once
    per message, never for the null sender, only if a pending recipient's NOTIFY allows DELAY."""
    if delay_warning <= 0 or entry.delay_warned or now < entry.created + delay_warning:
        return False
    return bool(delay_recipients(entry))


def clean_text(text: str, limit: int = MAX_REPLY) -> str:
    """Control characters (CR, LF, escapes) become one space; at most ``limit`` characters."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reply_status(reply: Reply) -> str:
    """The RFC 3463 code of a reply: its own enhanced code when it agrees with the reply's class,
    else the class alone (``x.0.0``); anything but 2xx/5xx counts as temporary."""
    first = reply.code // 100
    klass = first if first in (2, 5) else 4
    if _ENHANCED.fullmatch(reply.enhanced) and reply.enhanced[0] == str(klass):
        return reply.enhanced
    return f"{klass}.0.0"


def _outcome(
    recipient: QueuedRecipient, state: str, status: str, text: str, host: str, now: float
) -> None:
    recipient.state = state
    recipient.status = status
    recipient.attempts += 1
    recipient.last_reply = clean_text(text)
    recipient.remote_mta = clean_text(host, MAX_HOST)
    recipient.last_attempt = now
    recipient.final_time = None if state == PENDING else now


def apply_reply(recipient: QueuedRecipient, reply: Reply, host: str, now: float) -> None:
    """The host's answer for this recipient: 2xx delivered, 5xx bounced, anything else retried."""
    if recipient.state == PENDING:
        status = reply_status(reply)
        state = {"2": DELIVERED, "5": BOUNCED}.get(status[0], PENDING)
        _outcome(recipient, state, status, str(reply), host, now)


def _leading_status(text: str, klass: str) -> str | None:
    """The RFC 3463 code a reason starts with ("5.1.10 null MX ..."), when it has the right class."""
    code = text.split(" ", 1)[0]
    return code if _ENHANCED.fullmatch(code) and code[0] == klass else None


def apply_host_failure(recipient: QueuedRecipient, failure: HostFailure, now: float) -> None:
    """No host gave a per-recipient answer this round; ``failure`` is the one that ended it (the last
    host's, or a permanent one).  Call once per round, not once per host tried.

    Only ``failure.permanent`` (no SMTPUTF8, too large for the host) bounces: a 5xx greeting from one
    host is that host's problem, not the recipient's.  The status takes its class from that decision;
    without a reply it is 4.4.1 (no answer from host) or 5.0.0.
    """
    if recipient.state != PENDING:
        return
    permanent = failure.permanent
    if failure.reply is not None:
        text, status = str(failure.reply), reply_status(failure.reply)
    else:
        klass = "5" if permanent else "4"
        text = str(failure)
        status = _leading_status(failure.reason, klass) or ("5.0.0" if permanent else "4.4.1")
    status = ("5" if permanent else "4") + status[1:]
    _outcome(recipient, BOUNCED if permanent else PENDING, status, text, failure.host, now)


def apply_destination_error(recipient: QueuedRecipient, error: DestinationError, now: float) -> None:
    """No host to try: permanent (NXDOMAIN, null MX) bounces, a DNS failure stays pending, with the
    code the reason starts with ("5.1.10" for a null MX, RFC 7505), else 5.1.2 (bad destination
    system) or 4.4.3 (directory server failure)."""
    if recipient.state == PENDING:
        state, status = (BOUNCED, "5.1.2") if error.permanent else (PENDING, "4.4.3")
        status = _leading_status(error.reason, status[0]) or status
        _outcome(recipient, state, status, str(error), "", now)


def expire(recipient: QueuedRecipient, now: float, lifetime: float) -> None:
    """The queue lifetime ran out: a pending recipient bounces.  Its status and reply stay those of the
    last real problem (RFC 3463 §3.5 prefers them to 4.4.7, used only when there was none)."""
    if recipient.state != PENDING:
        return
    recipient.state = BOUNCED
    recipient.final_time = now
    if not recipient.status.startswith("4."):
        recipient.status = "4.4.7"
    if not recipient.last_reply:
        recipient.last_reply = f"not delivered within {_duration(lifetime)}"


def apply_admin_bounce(recipient: QueuedRecipient, now: float) -> None:
    """``kmsctl queue bounce``: a pending recipient fails now with 5.0.0; the runner reports it."""
    if recipient.state == PENDING:
        recipient.state = BOUNCED
        recipient.status = ADMIN_BOUNCE_STATUS
        recipient.last_reply = ADMIN_BOUNCE_TEXT
        recipient.remote_mta = ""
        recipient.final_time = now


def _duration(seconds: float) -> str:
    """``5 days``, ``4 hours``, ``90 minutes``: a lifetime as people say it."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"
