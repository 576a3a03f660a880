"""Tests for kms.logs: line format, injection resistance, categories, secrets, files and rotation."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from kms.clientinfo import ClientInfo
from kms.logs import MAX_VALUE_LENGTH, Logs, format_line, format_value

WHEN = 1795815600.123  # 2026-11-27T21:40:00.123Z

# timestamp session listener client... event fields: what a log reader (or fail2ban) relies on.
LINE = re.compile(r'\S+ \S+ \S+ (?:\S+ )?\[\S+\] \S+(?: [A-Za-z0-9_]+=(?:[!#-\[\]-~]+|"(?:[^"\\]|\\.)*"))*')


def client(**changes: object) -> ClientInfo:
    info = ClientInfo("192.0.2.7", 40000, "127.0.0.1", 2525, "smtp", session_id="abc123000001")
    for name, value in changes.items():
        setattr(info, name, value)
    return info


def unescape(quoted: str) -> str:
    """Undo format_value, as a log reader would."""
    if not quoted.startswith('"'):
        return quoted
    body = quoted[1:-1]
    return re.sub(
        r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|["\\])',
        lambda m: m.group(1) if m.group(1) in '"\\' else chr(int(m.group(1)[1:], 16)),
        body,
    )


class FormatTests(TestCase):
    def test_line_layout(self) -> None:
        """Timestamp, session, listener, client, event, then key=value fields in the order given."""
        line = format_line(
            WHEN,
            "auth.failed",
            client(reverse_name="mx.example.test"),
            {"user": "bob@example.test", "mechanism": "PLAIN", "reason": "wrong password"},
        )
        self.assertEqual(
            line,
            "2026-11-27T21:40:00.123Z abc123000001 smtp mx.example.test [192.0.2.7] auth.failed "
            'user=bob@example.test mechanism=PLAIN reason="wrong password"',
        )

    def test_without_client(self) -> None:
        """Server-side events put a dash in each client column, so columns still line up."""
        self.assertEqual(format_line(0.0, "started", None, {}), "1970-01-01T00:00:00.000Z - - - started")

    def test_client_without_reverse_name(self) -> None:
        self.assertEqual(
            format_line(WHEN, "connect", client(), {"port": 2525}),
            "2026-11-27T21:40:00.123Z abc123000001 smtp [192.0.2.7] connect port=2525",
        )

    def test_milliseconds_are_truncated_not_rounded(self) -> None:
        """.9999 s stays in the same second: a line never carries a time later than the event."""
        self.assertEqual(format_line(59.9999, "e", None, {})[:24], "1970-01-01T00:00:59.999Z")

    def test_value_quoting(self) -> None:
        cases = {
            "plain": "plain",
            "a=b": "a=b",
            "": '""',
            "two words": '"two words"',
            'say "hi"': r'"say \"hi\""',
            "back\\slash": r'"back\\slash"',
            "caf\u00e9": '"caf\u00e9"',
            "tab\there": r'"tab\x09here"',
            "nul\x00": r'"nul\x00"',
            "esc\x1b[31m": r'"esc\x1b[31m"',
            "del\x7f": r'"del\x7f"',
            "nbsp\u00a0": r'"nbsp\xa0"',
            "rlo\u202eevil": r'"rlo\u202eevil"',
            "ls\u2028": r'"ls\u2028"',
            "surrogate\udcff": r'"surrogate\udcff"',
            "tag\U000e0041": r'"tag\U000e0041"',
            42: "42",
            None: "None",
        }
        for value, expected in cases.items():
            with self.subTest(value=value):
                self.assertEqual(format_value(value), expected)

    def test_overlong_values_are_truncated_with_a_marker(self) -> None:
        self.assertEqual(format_value("x" * MAX_VALUE_LENGTH), "x" * MAX_VALUE_LENGTH)
        self.assertEqual(
            format_value("x" * (MAX_VALUE_LENGTH + 100)),
            '"' + "x" * MAX_VALUE_LENGTH + '...[100 more chars]"',
        )

    def test_crlf_in_a_value_cannot_forge_a_line(self) -> None:
        """The classic: a user name that ends the line and starts a fake successful login."""
        hostile = "bob\r\n2026-11-27T21:40:00.000Z x smtp [10.0.0.1] auth.ok user=admin"
        line = format_line(WHEN, "auth.failed", client(), {"user": hostile})
        self.assertNotIn("\n", line)
        self.assertNotIn("\r", line)
        self.assertTrue(
            line.endswith(r'user="bob\x0d\x0a2026-11-27T21:40:00.000Z x smtp [10.0.0.1] auth.ok user=admin"')
        )
        self.assertRegex(line, "^" + LINE.pattern + "$")

    def test_hostile_reverse_name_and_address(self) -> None:
        """Reverse DNS answers are attacker-controlled: they cannot add a field, a line or a fake address."""
        line = format_line(
            WHEN, "connect", client(reverse_name="evil\r\nx [10.0.0.1] auth.ok", peer_host="1.2.3.4 x"), {}
        )
        self.assertEqual(
            line,
            r"2026-11-27T21:40:00.123Z abc123000001 smtp evil\x0d\x0ax\x20\x5b10.0.0.1\x5d\x20auth.ok "
            r"[1.2.3.4\x20x] connect",
        )

    def test_bad_event_and_key_names_are_programming_errors(self) -> None:
        for event in ["", "two words", "line\nbreak", "-starts-with-dash"]:
            with self.subTest(event=event):
                self.assertRaises(ValueError, format_line, WHEN, event, None, {})
        for key in ["", "a b", "a=b", "x\n"]:
            with self.subTest(key=key):
                self.assertRaises(ValueError, format_line, WHEN, "e", None, {key: 1})

    def test_secret_keys_are_refused(self) -> None:
        """Never log a password: keys that look like one raise, whatever the value."""
        for key in [
            "password",
            "Password",
            "master_password",
            "secret",
            "client_secret",
            "response",
            "cram_response",
            "key",
            "store_key",
            "apikey",
        ]:
            with self.subTest(key=key):
                error = self.assertRaises(ValueError, format_line, WHEN, "e", None, {key: "x"})
                self.assertIn(key, str(error))

    @given(st.text(), st.text())
    def test_any_value_stays_on_one_line_and_round_trips(self, value: str, name: str) -> None:
        """Whatever a client sends, the line is one line, parses, and the value can be recovered."""
        line = format_line(WHEN, "e", client(reverse_name=name or None), {"v": value, "w": "end"})
        self.assertEqual(line.splitlines(), [line])
        self.assertTrue(line.isprintable())
        self.assertRegex(line, "^" + LINE.pattern + "$")
        self.assertTrue(line.endswith(" w=end"))
        raw = line[line.index(" e v=") + 5 : -len(" w=end")]
        if len(value) <= MAX_VALUE_LENGTH:
            self.assertEqual(unescape(raw), value)
        else:
            marker = f"...[{len(value) - MAX_VALUE_LENGTH} more chars]"
            self.assertTrue(raw.endswith(marker + '"'))
            self.assertEqual(unescape(raw.replace(marker, "")), value[:MAX_VALUE_LENGTH])


class LogsTests(TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()) / "logs"
        self.now = WHEN
        self.logs = Logs(self.directory, debug_categories=["smtp"], clock=lambda: self.now)
        self.addCleanup(self.logs.close)

    def lines(self, name: str) -> list[str]:
        return (self.directory / f"{name}.log").read_text().splitlines()

    def capture_twisted_log(self) -> list[LogEvent]:
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    def test_creates_directory_and_files_with_private_modes(self) -> None:
        """Logs hold addresses and user names: not world-readable."""
        self.assertEqual(stat.S_IMODE(self.directory.stat().st_mode) & 0o027, 0)
        for name in ("mail", "security", "error", "debug"):
            path = self.directory / f"{name}.log"
            self.assertEqual(path.read_text(), "")
            self.assertEqual(stat.S_IMODE(path.stat().st_mode) & 0o137, 0, name)

    def test_modes_are_exact_under_a_permissive_umask(self) -> None:
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        directory = Path(self.mktemp()) / "logs"
        Logs(directory).close()
        self.assertEqual(stat.S_IMODE(directory.stat().st_mode), 0o750)
        self.assertEqual(stat.S_IMODE((directory / "mail.log").stat().st_mode), 0o640)

    def test_each_log_gets_its_own_events(self) -> None:
        self.logs.mail("delivered", client(), to="bob@example.test")
        self.logs.security("auth.failed", client(), user="bob@example.test")
        self.logs.error("queue.corrupt", id="Q1")
        self.assertEqual(
            self.lines("mail"),
            ["2026-11-27T21:40:00.123Z abc123000001 smtp [192.0.2.7] delivered to=bob@example.test"],
        )
        self.assertEqual(
            self.lines("security"),
            ["2026-11-27T21:40:00.123Z abc123000001 smtp [192.0.2.7] auth.failed user=bob@example.test"],
        )
        self.assertEqual(self.lines("error"), ["2026-11-27T21:40:00.123Z - - - queue.corrupt id=Q1"])
        self.assertEqual(self.lines("debug"), [])

    def test_appends_and_uses_the_clock(self) -> None:
        self.logs.mail("one")
        self.now = WHEN + 1.5
        self.logs.mail("two")
        self.assertEqual(
            self.lines("mail"),
            ["2026-11-27T21:40:00.123Z - - - one", "2026-11-27T21:40:01.623Z - - - two"],
        )

    def test_lines_are_on_disk_without_close(self) -> None:
        """Each line is written through at once: a crash loses nothing already logged."""
        self.logs.security("locked", user="bob")
        self.assertEqual(len(self.lines("security")), 1)

    def test_existing_content_is_kept(self) -> None:
        self.logs.mail("first")
        self.logs.close()
        again = Logs(self.directory)
        self.addCleanup(again.close)
        again.mail("second")
        self.assertEqual([line.split()[-1] for line in self.lines("mail")], ["first", "second"])

    def test_debug_only_for_enabled_categories(self) -> None:
        self.logs.debug("smtp", "command", client(), verb="EHLO")
        self.logs.debug("imap", "command", client(), verb="LOGIN")
        self.assertEqual(
            self.lines("debug"),
            ["2026-11-27T21:40:00.123Z abc123000001 smtp [192.0.2.7] smtp.command verb=EHLO"],
        )
        self.assertTrue(self.logs.debug_enabled("smtp"))
        self.assertFalse(self.logs.debug_enabled("imap"))

    def test_unknown_category_is_refused(self) -> None:
        """A typo in ``[logs] debug`` fails at start; a typo in code fails even when debug is off."""
        error = self.assertRaises(ValueError, Logs, Path(self.mktemp()), ["smtp", "stmp"])
        self.assertIn("stmp", str(error))
        self.assertRaises(ValueError, self.logs.debug, "stmp", "x")
        self.assertRaises(ValueError, self.logs.debug_enabled, "stmp")

    def test_all_known_categories_accepted(self) -> None:
        logs = Logs(
            Path(self.mktemp()),
            ["message_decoding", "update_checker", "auth", "ldap", "smtp", "imap", "pop3"],
        )
        self.addCleanup(logs.close)
        self.assertTrue(logs.debug_enabled("ldap"))

    def test_password_key_refused_and_nothing_written(self) -> None:
        self.assertRaises(ValueError, self.logs.security, "auth.failed", client(), password="hunter2")
        self.assertRaises(ValueError, self.logs.debug, "smtp", "auth", client(), response="aHVudGVyMg==")
        self.assertEqual(self.lines("security"), [])
        self.assertNotIn("hunter2", (self.directory / "debug.log").read_text())

    def test_injection_through_the_files(self) -> None:
        """CRLF in a value and in a reverse name still gives exactly one line on disk."""
        hostile = client(reverse_name="a.test\r\n2026-01-01T00:00:00.000Z - - - forged")
        self.logs.security("auth.failed", hostile, user="x\ny", helo="\r\n\r\n")
        content = (self.directory / "security.log").read_bytes()
        self.assertEqual(content.count(b"\n"), 1)
        self.assertNotIn(b"\r", content)

    def test_reopen_after_rotation(self) -> None:
        """logrotate renames the file and signals; after reopen() new lines go to a fresh file."""
        self.logs.mail("before")
        rotated = self.directory / "mail.log.1"
        (self.directory / "mail.log").rename(rotated)
        self.logs.mail("still-old-file")
        self.logs.reopen()
        self.logs.mail("after")
        self.assertEqual(
            [line.split()[-1] for line in rotated.read_text().splitlines()], ["before", "still-old-file"]
        )
        self.assertEqual([line.split()[-1] for line in self.lines("mail")], ["after"])
        self.assertEqual(stat.S_IMODE((self.directory / "mail.log").stat().st_mode) & 0o137, 0)

    def test_write_after_close_reopens(self) -> None:
        """Connections closing during shutdown still get their lines written."""
        self.logs.close()
        self.logs.security("late", user="bob")
        self.assertEqual([line.split()[-2] for line in self.lines("security")], ["late"])

    def test_errors_also_go_to_twisted_logger(self) -> None:
        events = self.capture_twisted_log()
        self.logs.error("disk.low", free="90MB")
        self.logs.mail("delivered")
        mine = [e for e in events if e.get("log_namespace") == "kms"]
        self.assertEqual(len(mine), 1)
        self.assertEqual(mine[0]["log_level"], LogLevel.error)
        self.assertEqual(mine[0]["kms_line"], "- - - disk.low free=90MB")

    def test_write_failure_does_not_raise(self) -> None:
        """A full disk must not kill the session that tried to log; twistd's log gets the line instead."""
        events = self.capture_twisted_log()
        self.logs.close()
        (self.directory / "mail.log").unlink()
        (self.directory / "mail.log").mkdir()
        self.logs.mail("delivered", to="bob")
        lost = [e for e in events if "kms_line" in e]
        self.assertEqual(len(lost), 1)
        self.assertEqual(lost[0]["name"], "mail")
        self.assertIn("delivered to=bob", str(lost[0]["kms_line"]))
