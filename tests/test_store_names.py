"""IMAP mailbox names ↔ Maildir++ directories: 1:1, ASCII, never outside the user's root."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from kms.store.interfaces import MailboxError
from kms.store.names import canonical_name, folder_directory, folder_name, is_inferior, parent_names

# Components as a client could send them: any text without "/" and control characters.
_component = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/"), min_size=1, max_size=12
).filter(lambda c: c not in (".", ".."))
_names = (
    st.lists(_component, min_size=1, max_size=4)
    .map("/".join)
    .filter(lambda n: folder_directory_or_none(n) is not None)
)


def folder_directory_or_none(name: str) -> str | None:
    try:
        return folder_directory(name)
    except MailboxError:
        return None


class FolderDirectoryTests(TestCase):
    def test_examples(self) -> None:
        cases = {
            "INBOX": "",
            "inbox": "",
            "Sent": ".Sent",
            "A/B": ".A.B",
            "a.b": ".a%2Eb",
            "100%": ".100%25",
            "Entwürfe": ".Entw%C3%BCrfe",
            "my folder_1-2": ".my folder_1-2",
            "inbox/Sub": ".INBOX.Sub",
            "~/x": ".%7E.x",
            "tmp": ".tmp",
            "cur/new": ".cur.new",
        }
        for name, directory in cases.items():
            self.assertEqual(folder_directory(name), directory, name)

    def test_refused(self) -> None:
        """Nothing a client sends can name a path outside the root or a maildir internal."""
        refused = [
            "",
            "/",
            "/etc/passwd",
            "a/",
            "a//b",
            ".",
            "..",
            "../x",
            "a/../../b",
            "a/./b",
            "a\x00b",
            "a\nb",
            "a\rb",
            "a\tb",
            "\x7f",
            "a\x85b",
            "a\ud800",
            "x" * 256,
            "é" * 128,
            "é" * 100,  # 200 bytes, but 600 once escaped: too long for a directory name
        ]
        for name in refused:
            with self.assertRaises(MailboxError, msg=repr(name)) as caught:
                folder_directory(name)
            self.assertEqual(caught.exception.code, "CANNOT")

    def test_inverse_refuses_foreign_directories(self) -> None:
        """Directories folder_directory would never produce do not alias a folder."""
        for directory in [
            ".INBOX",
            ".inbox.x",
            ".a%2eb",
            ".a%41",
            ".%",
            ".a..b",
            ".",
            "..",
            "x",
            ".a.",
            ".%C3",
        ]:
            self.assertRaises(ValueError, folder_name, directory)

    def test_canonical(self) -> None:
        self.assertEqual(canonical_name("iNbOx"), "INBOX")
        self.assertEqual(canonical_name("Inbox/Work"), "INBOX/Work")
        self.assertEqual(canonical_name("Work/inbox"), "Work/inbox")

    def test_hierarchy_helpers(self) -> None:
        self.assertEqual(parent_names("a/b/c"), ["a", "a/b"])
        self.assertEqual(parent_names("a"), [])
        self.assertTrue(is_inferior("a/b", "a"))
        self.assertFalse(is_inferior("ab", "a"))
        self.assertFalse(is_inferior("a", "a"))

    @given(st.lists(_component, min_size=1, max_size=4).map("/".join))
    def test_valid_or_refused_with_cannot(self, name: str) -> None:
        """Every name either maps to a directory or is refused with CANNOT, never anything else."""
        try:
            folder_directory(name)
        except MailboxError as e:
            self.assertEqual(e.code, "CANNOT")
            self.assertGreater(len(name.encode()) * 3, 255)

    @given(_names)
    def test_round_trip(self, name: str) -> None:
        """Every acceptable name maps to one ASCII directory directly under the root, and back."""
        directory = folder_directory(name)
        self.assertTrue(directory.isascii())
        self.assertNotIn("/", directory)
        self.assertNotIn("\x00", directory)
        self.assertEqual(folder_name(directory), canonical_name(name))
        if canonical_name(name) != "INBOX":
            self.assertTrue(directory.startswith("."))
            self.assertNotIn(directory, (".", ".."))
            self.assertEqual(directory.count("."), name.count("/") + 1)

    @given(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20))
    def test_inverse_is_one_to_one(self, directory: str) -> None:
        """Any directory name the inverse accepts is exactly the one its name maps to."""
        try:
            name = folder_name(directory)
        except ValueError:
            return
        self.assertEqual(folder_directory(name), directory)
