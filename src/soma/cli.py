"""The ``soma`` console script: ``soma --version`` and ``soma demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["main"]


def _version() -> str:
    import soma

    return str(soma.__version__)


def format_event(event: dict[str, Any]) -> str:
    """One line per event, for watching a run in a terminal."""
    kind = event["event_type"]
    node = event.get("node_id")
    if kind == "RunStarted":
        return f"{kind:<14} {event['run_id']} ({event['n_nodes']} nodes, seed={event['seed']})"
    if kind == "NodeStarted":
        return f"{kind:<14} {node} [{event['kind']}, {event['target']}]"
    if kind == "NodeCacheHit":
        return f"{kind:<14} {node} {event['what']} from {event['tier']} ({event['key'][:16]})"
    if kind == "NodeCompleted":
        hit = ", cache hit" if event["cache_hit"] else ""
        return f"{kind:<14} {node} {event['duration_s'] * 1000:.1f} ms -> {event['output_summary']}{hit}"
    if kind == "RunCompleted":
        return (
            f"{kind:<14} {event['duration_s'] * 1000:.1f} ms, {event['nodes_executed']} executed, "
            f"{event['cache_hits']} from cache"
        )
    if kind == "RemoteDispatched":
        return f"{kind:<14} {', '.join(event['node_ids'])} -> {event['worker']} ({event['plan_id']})"
    if kind in ("NodeFailed", "RunFailed"):
        return f"{kind:<14} {node}: {event['error']}"
    return f"{kind:<14} {node if node is not None else ''}".rstrip()


def run_demo(out: TextIO) -> int:
    """Run the demo pipeline in process, then on a worker started here; print plans, live events, results, ``/info``.

    The worker listens on a free loopback port and is stopped (children included)
    before returning.
    """
    import json

    import numpy as np

    from soma.client.sync_client import close_all
    from soma.demo import build_graph, make_data
    from soma.lab import Lab
    from soma.worker.embedded import Worker

    def watch(graph: Any) -> Any:
        return graph.on_event(lambda event: out.write("  " + format_event(event) + "\n"))

    x, y = make_data()
    out.write("Pipeline: Scaler() >> (Ridge(alpha=1.0) | NearestNeighbours(k=3)) >> Average()\n\n")
    here = build_graph(seed=0)
    out.write(here.to_mermaid() + "\n\n")
    with watch(here):
        out.write(f"fit on {len(x)} rows in this process, for reference:\n")
        here.fit(x, y)
    expected = here.forward(x)

    out.write("\nstarting a local worker...\n")
    with Worker(port=0, max_concurrent=2) as worker:
        out.write(f"worker {worker.worker_id} at {worker.address}: {worker.info()}\n\n")
        try:
            graph = build_graph(seed=0)
            graph.add_worker(worker.address)
            out.write(graph.compile()["plan_text"] + "\n")
            with watch(graph):
                out.write(f"fit on {len(x)} rows on the worker:\n")
                graph.fit(x, y)
                out.write("forward:\n")
                prediction = graph.forward(x)
                out.write("run (every node's output, no learning, no cache):\n")
                outputs = graph.run(x)
                out.write("\nResults (root-mean-square error on the training rows):\n")
                for node_id in ("ridge", "nearest_neighbours", "average"):
                    rmse = float(np.sqrt(np.mean((outputs[node_id] - y) ** 2)))
                    out.write(f"  {node_id:<20} {rmse:.3f}\n")
                out.write(f"  first predictions    {np.round(prediction[:3], 2).tolist()}\n")
                out.write(f"  targets              {np.round(y[:3], 2).tolist()}\n")
                out.write(f"  same as in process   {bool(np.array_equal(prediction, expected))}\n\n")
                out.write("fit again with the same data (the worker serves the states from its cache):\n")
                graph.fit(x, y)
            info = Lab(worker.address.replace("ws://", "http://", 1)).info()
            out.write(f"\nworker /info:\n{json.dumps(info, indent=2, sort_keys=True)}\n")
        finally:
            close_all()
    out.write("worker stopped\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soma", description="Soma: filters composed into graphs.")
    parser.add_argument("--version", action="version", version=f"soma {_version()}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("demo", help="run a small fork/join pipeline on a local worker and show its events")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``soma`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(sys.stdout)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
