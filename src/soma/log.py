"""Named loggers, one per area. The library never configures handlers and never prints."""

from __future__ import annotations

import logging

cache_logger = logging.getLogger("soma.cache")
events_logger = logging.getLogger("soma.events")
runtime_logger = logging.getLogger("soma.runtime")
isolation_logger = logging.getLogger("soma.isolation")
wire_logger = logging.getLogger("soma.wire")
child_logger = logging.getLogger("soma.worker.child")
worker_logger = logging.getLogger("soma.worker")
access_logger = logging.getLogger("soma.worker.access")
client_logger = logging.getLogger("soma.client")
