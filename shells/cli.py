"""The ``candy`` console command: parse settings, set up logging, run the chosen runtime."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import TextIO

from candy_core import ConfigError
from shells.settings import DaemonSettings, candy_version, parse_args

__all__ = ["configure_logging", "main"]

log = logging.getLogger("candy")

_HANDLER_NAME = "candy-cli"
_GEVENT_MISSING = "the gevent runtime needs the gevent package: pip install 'candy-py[gevent]'"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted."""

    def __init__(self) -> None:
        super().__init__()
        self.set_name(_HANDLER_NAME)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _not_library_chatter(record: logging.LogRecord) -> bool:
    """Drop pyroute2's records below WARNING: it logs every netlink message at DEBUG.

    (A handler filter, because importing pyroute2 resets its logger's level.)
    """
    return record.levelno >= logging.WARNING or not record.name.startswith("pyroute2")


def configure_logging(settings: DaemonSettings) -> None:
    """Log to stderr at INFO, or DEBUG with ``--debug``/``--verbose``.

    Calling it again replaces the handler it installed before.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = _StderrHandler()
    if settings.no_timestamp:
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    handler.addFilter(_not_library_chatter)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if settings.debug or settings.verbose else logging.INFO)


def _error(line: str) -> None:
    print(f"candy: error: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run ``candy`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("status", "ping"):  # candy status|ping: ask a running daemon
        from shells import ctl

        try:
            return ctl.main(argv)
        except KeyboardInterrupt:
            return 130
    try:
        try:
            settings = parse_args(argv)
        except ConfigError as exc:  # SettingsError, or a value the core config refused
            _error(str(exc))
            return 2
        except SystemExit as exc:  # --help, --version, or argparse's own usage error
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)

        configure_logging(settings)
        log.info("candy %s %s on %s runtime", candy_version(), settings.mode, settings.runtime)
        if settings.config_file is not None:
            log.debug("config file %s", settings.config_file)
        for note in settings.notes:
            log.warning("%s", note)
        if settings.auto_restart:
            log.debug("--auto-restart is accepted for compatibility and ignored")

        target = f"shells.{settings.runtime}.daemon"
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if settings.runtime == "gevent" and (exc.name or "").split(".")[0] == "gevent":
                _error(_GEVENT_MISSING)
                return 2
            if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
                _error(f"the {settings.runtime} runtime is not available ({exc})")
                return 1
            raise
        status = module.run(settings)
        return 0 if status is None else int(status)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
