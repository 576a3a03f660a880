"""``twistd kms``: options and service construction for the plugin in twisted/plugins."""

from __future__ import annotations

import os
import sys

from twisted.application.service import IService
from twisted.internet import reactor
from twisted.python import usage

from kms.config import ConfigError, config_warnings, load_config, runtime_problems
from kms.service import build_service


class Options(usage.Options):
    optParameters = [["config", "c", "etc/kms.toml", "The kms configuration file (TOML)."]]


def makeService(options: Options) -> IService:
    """Load and check the config; on any problem print one line each and exit non-zero."""
    try:
        cfg = load_config(options["config"])
    except ConfigError as e:
        for line in e.problems:
            print(f"kms: {line}", file=sys.stderr)
        raise SystemExit(1)
    problems = runtime_problems(cfg)
    if problems:
        for line in problems:
            print(f"kms: {line}", file=sys.stderr)
        raise SystemExit(1)
    for line in config_warnings(cfg):
        print(f"kms: warning: {line}", file=sys.stderr)
    os.umask(0o027)
    return build_service(cfg, reactor)  # type: ignore[arg-type]
