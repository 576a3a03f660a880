"""``twistd kms``: options and service construction for the plugin in twisted/plugins."""

from __future__ import annotations

import atexit
import logging
import os
import sys

from twisted.application.service import IService, IServiceCollection
from twisted.internet import reactor
from twisted.python import usage

from kms.config import Config, ConfigError, config_warnings, load_config, runtime_problems
from kms.logs import Logs
from kms.service import StorePaths, build_service
from kms.store.space import SpaceWatch

EXIT_STOPPED = 1  # the status of a twistd that the store's hard limit stopped (hard_limit_action = "stop")


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
        _log_refusal(cfg, problems)
        raise SystemExit(1)
    for line in config_warnings(cfg):
        print(f"kms: warning: {line}", file=sys.stderr)
    os.umask(0o027)
    service = build_service(cfg, reactor)  # type: ignore[arg-type]
    atexit.register(_exit_status, service)
    return service


def _log_refusal(cfg: Config, problems: list[str]) -> None:
    """A refused start in error.log too, where an admin of a supervised server looks (stderr may
    be gone), if the store exists; a log that cannot be written leaves stderr's word."""
    if not cfg.store.path.is_dir():
        return
    try:
        logs = Logs(StorePaths(cfg.store.path).logs)
    except OSError:
        return
    for line in problems:
        logs.error("start-refused", level="critical", problem=line)
    logs.close()


def _exit_status(service: IServiceCollection) -> None:
    """At interpreter exit: a server stopped by the store's hard limit exits with `EXIT_STOPPED`
    so its supervisor sees a failure (twistd itself exits 0 whenever its reactor stops).

    Exit handlers run after twistd has stopped every service (index caches saved, the maildir
    writer drained, logs closed) and removed its pid file; this one then flushes what buffers
    remain (the standard library's logging, stdout, stderr) before `os._exit`, which skips the
    handlers registered before it (logging's own shutdown among them, done here)."""
    watch = service.getServiceNamed("space-watch")
    if not (isinstance(watch, SpaceWatch) and watch.stopped_server):
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_STOPPED)
