"""``soma-worker``: run a worker from the command line (worker spec §2.1–§2.3).

Exit codes: 0 after a clean stop (SIGINT, SIGTERM or an accepted ``Shutdown``), 1 when the
address cannot be bound or startup fails, 2 for an invalid flag (one line on stderr).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Sequence

from soma.errors import SomaConfigError
from soma.log import worker_logger
from soma.worker.config import config_from_args
from soma.worker.trust import deferred_trust, load_deferred_trust

__all__ = ["main"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _configure_logging(level: int) -> None:
    """Log to stderr at ``level``: the one place where Soma configures handlers (an application)."""
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)
    # aiohttp's own chatter (e.g. websocket protocol warnings) only at WARNING and above.
    logging.getLogger("aiohttp").setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), serve until stopped, return the exit code."""
    try:
        config = config_from_args(argv)
    except SomaConfigError as exc:
        sys.stderr.write(f"soma-worker: error: {exc}\n")
        return 2
    except SystemExit as exc:  # --help and --version print and stop here
        return exc.code if isinstance(exc.code, int) else 0
    _configure_logging(config.logging_level)
    # Imported here so that --help and flag errors answer without loading the server stack,
    # and with aiohttp's client CA loading put off until the worker listens.
    with deferred_trust():
        from soma.worker.app import BindError, WorkerServer

    def on_ready(_: object) -> None:
        threading.Thread(target=load_deferred_trust, name="soma-load-trust", daemon=True).start()

    try:
        asyncio.run(WorkerServer(config).serve(on_ready=on_ready, install_signals=True))
    except BindError as exc:
        worker_logger.error("%s", exc)
        return 1
    except SomaConfigError as exc:
        worker_logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during the drain
        return 130
    except Exception:
        worker_logger.exception("the worker failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
