"""Makes ``twistd kms`` exist; the service itself is built in `kms.tap`."""

from twisted.application.service import ServiceMaker

kms = ServiceMaker("kms", "kms.tap", "kms mail server (SMTP, submission, POP3, IMAP)", "kms")
