"""``soma-worker``: the daemon that runs plans from clients in isolated children."""
