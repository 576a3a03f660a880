"""Delivery status notifications: the RFC 3464 report we send back to a message's envelope sender.

One `build_dsn` call makes one ``multipart/report; report-type=delivery-status`` message for one
entry and one kind of news (failed, delayed, delivered, relayed) about some of its recipients:

1. ``text/plain``: what happened, per recipient, with the remote server's reply;
2. ``message/delivery-status``: Reporting-MTA, Original-Envelope-Id (ENVID), Arrival-Date, and
   per recipient Original-Recipient (ORCPT), Final-Recipient, Action, Status, Remote-MTA,
   Diagnostic-Code, Last-Attempt-Date, Will-Retry-Until;
3. the original message: whole (``message/rfc822``) in a failure report unless RET=HDRS asked for
   the header only or it is larger than `RETURN_LIMIT`; otherwise its header (``text/rfc822-headers``).
   RFC 3461 §4.3 leaves the choice to us when RET is absent: we return the whole message, as the
   sender may have no other copy.  Delay and success reports return the header only.

Addresses outside ASCII (SMTPUTF8) follow RFC 6533: the status part becomes
``message/global-delivery-status`` and such addresses get the ``utf-8`` address type, raw UTF-8;
a returned header with UTF-8 becomes ``message/global`` / ``message/global-headers``.

The result uses LF line endings like every stored message (the client sends CRLF).  Queue it with
the null sender to ``entry.sender``, with ``body_8bit = not data.isascii()`` and ``smtputf8 = not
entry.sender.isascii()``.  Everything taken from the entry or the remote reply is hostile text:
control characters are flattened and lengths bounded, so nothing can add a header line or a part.
Pure: no I/O; randomness only for the boundary and the Message-ID.
"""

from __future__ import annotations

import secrets
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

from kms.queue.interfaces import QueuedRecipient, QueueEntry
from kms.queue.schedule import clean_text
from kms.wireform import body_start

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"

RETURN_LIMIT = 256 * 1024  # a larger message comes back as its header only

SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
    RELAYED: "Successful Mail Delivery Report",
}
_DEFAULT_STATUS = {FAILED: "5.0.0", DELAYED: "4.0.0", DELIVERED: "2.0.0", RELAYED: "2.0.0"}
_MAX_FIELD = 900  # an unbreakable reply or address still stays below SMTP's 998-octet line limit


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, UTC))


def _address_field(address: str) -> str:
    """``rfc822; addr``, or RFC 6533's ``utf-8; addr`` for an internationalized address."""
    address = clean_text(address, _MAX_FIELD)
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


def _orcpt_field(orcpt: str) -> str | None:
    """ORCPT as received (``type;address``, xtext decoded), or None when it is not of that form."""
    kind, sep, value = clean_text(orcpt, _MAX_FIELD).partition(";")
    kind, value = kind.strip(), value.strip()
    if not sep or not value or not kind or not kind.replace("-", "").isalnum() or len(kind) > 32:
        return None
    return f"{kind};{value}"


def _remote_name(remote_mta: str) -> str:
    """``mx1.example.org`` out of ``mx1.example.org [192.0.2.1]``."""
    return clean_text(remote_mta).partition(" [")[0].strip()


def _is_smtp_reply(text: str) -> bool:
    """``550 5.1.1 ...`` rather than a connection problem described in words."""
    return len(text) >= 3 and text[:3].isdigit() and text[0] in "2345" and (len(text) == 3 or text[3] in " -")


def _fold(name: str, value: str) -> list[str]:
    """One header field, folded at spaces to about 78 columns (a long word stays whole)."""
    lines = textwrap.wrap(
        f"{name}: {value}", width=78, subsequent_indent=" ", break_long_words=False, break_on_hyphens=False
    )
    return lines or [f"{name}:"]


def _status(recipient: QueuedRecipient, kind: str) -> str:
    """The recipient's RFC 3463 code, kept consistent with the Action (a delay is never 5.x.x)."""
    status = recipient.status or _DEFAULT_STATUS[kind]
    wanted = {DELAYED: "4", DELIVERED: "2", RELAYED: "2"}.get(kind)
    if wanted is not None and status[0] != wanted:
        return _DEFAULT_STATUS[kind]
    return status


def _recipient_block(recipient: QueuedRecipient, kind: str, will_retry_until: float | None) -> list[str]:
    lines = []
    if recipient.orcpt and (orcpt := _orcpt_field(recipient.orcpt)):
        lines += _fold("Original-Recipient", orcpt)
    lines += _fold("Final-Recipient", _address_field(recipient.address))
    lines.append(f"Action: {kind}")
    lines.append(f"Status: {_status(recipient, kind)}")
    if recipient.remote_mta and (name := _remote_name(recipient.remote_mta)):
        lines += _fold("Remote-MTA", f"dns; {name}")
    reply = clean_text(recipient.last_reply, _MAX_FIELD)
    if _is_smtp_reply(reply):
        lines += _fold("Diagnostic-Code", f"smtp; {reply}")
    if recipient.last_attempt is not None:
        lines.append(f"Last-Attempt-Date: {_date(recipient.last_attempt)}")
    if kind == DELAYED and will_retry_until is not None:
        lines.append(f"Will-Retry-Until: {_date(will_retry_until)}")
    return lines


def _status_part(
    entry: QueueEntry,
    recipients: Sequence[QueuedRecipient],
    kind: str,
    reporting_mta: str,
    will_retry_until: float | None,
) -> tuple[str, str]:
    """The machine-readable part: (content type, text)."""
    lines = [f"Reporting-MTA: dns; {clean_text(reporting_mta)}"]
    if entry.envid:  # xtext-decoded, so printable ASCII unless the client lied; never raw bytes here
        envid = clean_text(entry.envid, 100).encode("ascii", "backslashreplace").decode("ascii")
        lines.append(f"Original-Envelope-Id: {envid}")
    lines.append(f"Arrival-Date: {_date(entry.created)}")
    for recipient in recipients:
        lines.append("")
        lines += _recipient_block(recipient, kind, will_retry_until)
    text = "\n".join(lines) + "\n"
    kind_type = "message/delivery-status" if text.isascii() else "message/global-delivery-status"
    return kind_type, text


def _reason(recipient: QueuedRecipient, kind: str) -> str:
    reply = clean_text(recipient.last_reply)
    host = clean_text(recipient.remote_mta)
    if kind in (DELIVERED, RELAYED):
        return f"delivered to {host}" if host else "delivered"
    if host and _is_smtp_reply(reply):
        why = f"host {host} said: {reply}"
    else:
        why = reply or "no details"  # a connection problem names the host itself
    if kind == FAILED and recipient.status.startswith("4."):
        why += " (a temporary problem that lasted longer than a message may stay in the queue)"
    return why


def _human_part(
    recipients: Sequence[QueuedRecipient],
    kind: str,
    reporting_mta: str,
    product: str | None,
    will_retry_until: float | None,
    returned_note: str,
) -> str:
    who = f"{clean_text(reporting_mta)} ({clean_text(product)})" if product else clean_text(reporting_mta)
    intro = {
        FAILED: "Your message could not be delivered to the recipients below. This is final: nothing "
        "more will be tried for them.",
        DELAYED: "Your message has not been delivered yet to the recipients below. Delivery is still "
        "being retried"
        + (f" until {_date(will_retry_until)}" if will_retry_until is not None else "")
        + "; you will get another report if it fails. You do not need to send the message again.",
        DELIVERED: "Your message was delivered to the recipients below.",
        RELAYED: "Your message was passed on to the mail systems of the recipients below, which may "
        "not report on it again.",
    }[kind]
    paragraphs = [f"This is the mail system at {who}.", intro]
    if returned_note:
        paragraphs.append(returned_note)
    lines: list[str] = []
    for paragraph in paragraphs:
        lines += textwrap.wrap(paragraph, width=76, break_on_hyphens=False) + [""]
    for recipient in recipients:
        lines += textwrap.wrap(
            f"<{clean_text(recipient.address)}>: {_reason(recipient, kind)}",
            width=76,
            subsequent_indent="    ",
            break_on_hyphens=False,
        )
    return "\n".join(lines) + "\n"


def _returned(entry: QueueEntry, kind: str, body: bytes) -> tuple[str, bytes, str]:
    """What goes back of the original message: (content type, bytes, note for the human part)."""
    whole = kind == FAILED and entry.ret != "HDRS"
    if whole and len(body) <= RETURN_LIMIT and len(body) >= entry.size:
        data = body if body.endswith(b"\n") else body + b"\n"
        return ("message/rfc822" if _header_of(body).isascii() else "message/global"), data, ""
    header = _header_of(body)
    note = ""
    if whole:
        note = f"The message was larger than {RETURN_LIMIT // 1024} KB: only its header is returned below."
    return ("text/rfc822-headers" if header.isascii() else "message/global-headers"), header, note


def _header_of(body: bytes) -> bytes:
    """The header section without its ending blank line, cut at a line end within `RETURN_LIMIT`."""
    head = body[: body_start(body)]
    if len(head) > RETURN_LIMIT or (head == body and not body.endswith(b"\n")):
        cut = head.rfind(b"\n", 0, RETURN_LIMIT)
        head = head[: cut + 1] if cut >= 0 else b""
    head = head.rstrip(b"\r\n")
    return head + b"\n" if head else b""


def build_dsn(
    entry: QueueEntry,
    recipients: Sequence[QueuedRecipient],
    kind: str,
    *,
    reporting_mta: str,
    now: float,
    body: bytes | None = None,
    product: str | None = None,
    will_retry_until: float | None = None,
) -> bytes:
    """The whole DSN message (see the module docstring).

    ``body`` is the queued message (the runner may pass only its first `RETURN_LIMIT` + 1 bytes;
    ``entry.size`` says whether that was all of it); None leaves the original out.  ``product`` names
    the software in the text (None when versions are hidden); ``will_retry_until`` is the end of the
    queue lifetime, shown in a delay report.  A message with the null sender gets no DSN: ValueError.
    """
    if kind not in SUBJECTS:
        raise ValueError(f"unknown DSN kind {kind!r}")
    if not entry.sender:
        raise ValueError("no DSN for a message with the null sender")
    if not recipients:
        raise ValueError("a DSN names at least one recipient")
    host = clean_text(reporting_mta)
    returned = _returned(entry, kind, body) if body is not None else None
    status_type, status_text = _status_part(entry, recipients, kind, host, will_retry_until)
    human = _human_part(recipients, kind, host, product, will_retry_until, returned[2] if returned else "")

    parts: list[tuple[str, bytes]] = [
        (f"text/plain; charset={'us-ascii' if human.isascii() else 'utf-8'}", human.encode("utf-8")),
        (status_type, status_text.encode("utf-8")),
    ]
    if returned is not None:
        parts.append((returned[0], returned[1]))
    boundary = _boundary([data for _, data in parts])

    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{clean_text(entry.sender)}>",
        f"Subject: {SUBJECTS[kind]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{entry.id}.{secrets.token_hex(8)}@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
    ]
    out = ["\n".join(headers).encode("utf-8")]
    for content_type, data in parts:
        encoding = "7bit" if data.isascii() else "8bit"
        part = f"--{boundary}\nContent-Type: {content_type}\nContent-Transfer-Encoding: {encoding}\n\n"
        out.append(part.encode("ascii"))
        out.append(data + b"\n")  # the line break before a boundary belongs to the boundary (RFC 2046)
    out.append(f"--{boundary}--\n".encode())
    return b"".join(out)


def _boundary(contents: Sequence[bytes]) -> str:
    """A boundary that none of the parts contains (the returned message is anybody's text)."""
    while True:
        boundary = f"=_kms-dsn-{secrets.token_hex(12)}"
        marker = f"--{boundary}".encode()
        if not any(marker in data for data in contents):
            return boundary
