"""The realm: turns the canonical address a checker vouched for into what a protocol needs.

SMTP only needs to know who the sender is (`IMailUser`); IMAP and POP3 will need an account and a
mailbox.  Each is one entry in the realm's interface -> factory table, so adding them touches
neither the checkers nor the login session.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from twisted.cred.portal import IRealm
from zope.interface import Attribute, Interface, implementer

Logout = Callable[[], None]
AvatarFactory = Callable[[str], tuple[object, Logout]]


class IMailUser(Interface):
    """An authenticated mail user; every avatar the realm hands out provides (or adapts to) this."""

    address = Attribute("str: the canonical address, as the checker returned it")


@implementer(IMailUser)
@dataclass(frozen=True)
class MailUser:
    """Just the identity: enough for SMTP AUTH, where rights depend on who, not on a mailbox."""

    address: str


def _nothing_to_release() -> None:
    """A `MailUser` holds no resources, so logging it out has nothing to do."""


def _mail_user(address: str) -> tuple[object, Logout]:
    return MailUser(address), _nothing_to_release


@implementer(IRealm)
class Realm:
    """Hands out avatars by interface; protocols ask for the one they need through the portal."""

    def __init__(self, factories: Mapping[type[Interface], AvatarFactory] | None = None) -> None:
        """``factories`` adds avatar kinds (IMAP account, POP3 mailbox) to the built-in `IMailUser`."""
        self._factories: dict[type[Interface], AvatarFactory] = {IMailUser: _mail_user, **(factories or {})}

    def requestAvatar(  # type: ignore[override]  # our checkers' avatar ids are str addresses
        self, avatarId: str, mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], object, Logout]:
        """The avatar for the first of ``interfaces`` this realm knows, with its logout callable."""
        for interface in interfaces:
            factory = self._factories.get(interface)
            if factory is not None:
                avatar, logout = factory(avatarId)
                return interface, avatar, logout
        raise NotImplementedError(f"no avatar for {', '.join(i.getName() for i in interfaces) or 'nothing'}")
