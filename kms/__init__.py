"""kms: a mail server on Twisted (SMTP, POP3, IMAP) after Kerio MailServer's Advanced Options."""

__version__ = "0.1.0"
