"""The configuration loader: the sample file is valid, and every mistake is reported, each by key."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from kms.config import (
    LISTENER_NAMES,
    ConfigError,
    config_warnings,
    load_config,
    parse_duration,
    parse_size,
    runtime_problems,
)

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "kms.toml"

MINIMAL = """
[server]
hostname = "mail.example.test"
[domains]
local = ["example.test"]
[store]
path = "store"
"""


class ValueParsersTests(TestCase):
    def test_sizes(self) -> None:
        """Decimal and binary units, bare integers, and refusals for anything else."""
        self.assertEqual(parse_size("50MB"), 50_000_000)
        self.assertEqual(parse_size("1GiB"), 2**30)
        self.assertEqual(parse_size("512 kb"), 512_000)
        self.assertEqual(parse_size(4096), 4096)
        self.assertEqual(parse_size("0"), 0)
        for bad in ("50XB", "MB", "-1MB", "", True, -5, [1]):
            self.assertRaises(ValueError, parse_size, bad)

    def test_durations(self) -> None:
        """Units s/m/h/d/w, a bare number is seconds."""
        self.assertEqual(parse_duration("30m"), 1800)
        self.assertEqual(parse_duration("5d"), 432000)
        self.assertEqual(parse_duration("90"), 90)
        self.assertEqual(parse_duration(2.5), 2.5)
        for bad in ("5 days", "m", "-3s", True, None):
            self.assertRaises(ValueError, parse_duration, bad)


class LoadConfigTests(TestCase):
    def write(self, text: str) -> Path:
        d = Path(self.mktemp())
        d.mkdir()
        p = d / "kms.toml"
        p.write_text(text)
        return p

    def problems(self, text: str) -> list[str]:
        e = self.assertRaises(ConfigError, load_config, self.write(text))
        return e.problems

    def test_sample_is_valid(self) -> None:
        """The shipped sample configuration loads, with paths resolved against etc/."""
        cfg = load_config(SAMPLE)
        self.assertEqual(cfg.store.path, (SAMPLE.parent / "../var/store").resolve())
        self.assertEqual(cfg.smtp.max_message_size, 50_000_000)
        self.assertEqual(set(cfg.listeners), set(LISTENER_NAMES))
        self.assertTrue(cfg.group("local").contains("127.0.0.1"))
        self.assertFalse(cfg.group("").contains("127.0.0.1"))
        self.assertEqual(config_warnings(cfg), [])

    def test_minimal_defaults(self) -> None:
        """Everything but hostname, local domains and store path has a default."""
        cfg = load_config(self.write(MINIMAL))
        self.assertEqual(cfg.security.methods, ("CRAM-MD5", "DIGEST-MD5", "LOGIN", "NTLM", "PLAIN"))
        self.assertEqual(cfg.lockout.unlock_after, 1800)
        self.assertIsNone(cfg.directory)
        self.assertEqual(cfg.listeners, {})
        self.assertTrue(cfg.store.path.is_absolute())

    def test_every_problem_reported_at_once(self) -> None:
        """Several mistakes in several sections all appear, each naming its key."""
        problems = self.problems(
            MINIMAL
            + """
[smtp]
max_message_size = "50XB"
max_recipients = 0
colour = "blue"
[security]
policy = "paranoid"
methods = ["PLAIN", "KERBEROS"]
[relay]
local_group = "nowhere"
[bogus]
x = 1
"""
        )
        text = "\n".join(problems)
        for key in (
            "smtp.max_message_size:",
            "smtp.max_recipients:",
            "smtp.colour: unknown key",
            "security.policy:",
            "security.methods:",
            "relay.local_group:",
            "bogus: unknown section",
        ):
            self.assertIn(key, text)
        self.assertEqual(len(problems), 7, problems)

    def test_wrong_types(self) -> None:
        """A string where a boolean belongs (and the reverse) is named, not coerced."""
        problems = self.problems(MINIMAL + '[misc]\nhide_version = "yes"\n[lockout]\nattempts = true\n')
        self.assertEqual(len(problems), 2, problems)
        self.assertTrue(problems[0].startswith("misc.hide_version: must be true or false"))
        self.assertTrue(problems[1].startswith("lockout.attempts: must be an integer"))

    def test_store_rules(self) -> None:
        """UNC paths, hard_limit = 0 and a hard limit above the soft one are refused (SPEC §8)."""
        base = MINIMAL.replace('path = "store"', "")
        p = self.problems(base.replace("[store]", '[store]\npath = "\\\\\\\\server\\\\share"'))
        self.assertIn("UNC", p[0])
        p = self.problems(base.replace("[store]", '[store]\npath = "//server/share"'))
        self.assertIn("UNC", p[0])
        p = self.problems(MINIMAL + 'hard_limit = "0"\n')
        self.assertTrue(p[0].startswith("store.hard_limit: must not be 0"))
        p = self.problems(MINIMAL + 'soft_limit = "1MB"\nhard_limit = "2MB"\n')
        self.assertIn("above store.soft_limit", p[0])

    def test_bad_listener_and_ip_group(self) -> None:
        """Endpoint strings and IP group entries are parsed at load time."""
        problems = self.problems(
            MINIMAL + '[listeners]\nsmtp = "tcpp:25"\n[ip_groups]\nlocal = ["10.0.0.300"]\n'
        )
        self.assertTrue(any(p.startswith("listeners.smtp:") for p in problems), problems)
        self.assertTrue(any(p.startswith("ip_groups.local:") for p in problems), problems)

    def test_implicit_tls_needs_certificate(self) -> None:
        problems = self.problems(MINIMAL + '[listeners]\nsmtps = "tcp:2465"\n')
        self.assertEqual(
            problems, ["tls: certificate and private_key are required for smtps/pop3s/imaps listeners"]
        )

    def test_master_and_directory_rules(self) -> None:
        """Master needs a group; plain ldap:// needs start_tls or an explicit allow."""
        problems = self.problems(
            MINIMAL + '[master]\nenabled = true\ngroup = ""\n[directory]\nuri = "ldap://dc"\n'
            'base_dn = "DC=x"\nmail_domain = "example.test"\n'
        )
        self.assertTrue(any(p.startswith("master.group: is required") for p in problems), problems)
        self.assertTrue(any(p.startswith("directory.uri: ldap:// without start_tls") for p in problems))

    def test_not_toml(self) -> None:
        problems = self.problems("[server\nhostname=")
        self.assertEqual(len(problems), 1)
        self.assertIn("not valid TOML", problems[0])

    def test_missing_file(self) -> None:
        e = self.assertRaises(ConfigError, load_config, Path(self.mktemp()) / "none.toml")
        self.assertIn("cannot read", e.problems[0])

    def test_warnings_and_runtime_problems(self) -> None:
        """sha storage with challenge methods warns (the seed's warning); a missing cert stops a start."""
        cfg = load_config(
            self.write(
                MINIMAL + '[security]\npassword_storage = "sha"\n'
                '[tls]\ncertificate = "nope.pem"\nprivate_key = "nope.key"\n'
            )
        )
        warnings = config_warnings(cfg)
        self.assertEqual(len(warnings), 1)
        self.assertIn("CRAM-MD5, DIGEST-MD5", warnings[0])
        problems = runtime_problems(cfg)
        self.assertEqual([p.split(":")[0] for p in problems], ["tls.certificate", "tls.private_key"])

    def test_smarthost_credentials_file_checked_at_start(self) -> None:
        """Missing, malformed or readable by others: each stops a start, naming the key."""
        path = self.write(
            MINIMAL + '[relay]\nsmarthost = "relay.example.net:587"\n'
            'smarthost_credentials_file = "smarthost.secret"\n'
        )
        secret = path.parent / "smarthost.secret"
        cases = [(None, "cannot read"), ("no colon\n", "user:password"), ("u:p\n", "chmod 600")]
        for content, expected in cases:
            if content is not None:
                secret.write_text(content)
                secret.chmod(0o644)
            [problem] = runtime_problems(load_config(path))
            self.assertTrue(problem.startswith("relay.smarthost_credentials_file: "), problem)
            self.assertIn(expected, problem)
        secret.chmod(0o600)
        self.assertEqual(runtime_problems(load_config(path)), [])
