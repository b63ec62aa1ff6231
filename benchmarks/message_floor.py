"""Flower's own cost of a round: a simulation whose ClientApp does no work.

The scale benchmark (:mod:`benchmarks.scale`) compares a round of ``fedpersona simulate`` with
the partners' local work done in a plain loop. This one measures the floor under that ratio:
the same engine (``flwr.simulation.run_simulation``, Ray, the same client resources as the
product's simulation, ``cpus_per_partner`` 1.0 on 2 cores), the same number of partners and
messages per round (one train message and one evaluate message to each partner, as a
fedpersona round sends), and a ClientApp that answers each message at once with arrays of the
label model's size (three slots of 346 float32). Whatever a round costs here is Flower's
messaging, serialisation and scheduling, which no change inside fedpersona's ClientApp can
remove.

``python -m benchmarks.message_floor`` prints the table; ``python -m benchmarks.run --only
message_floor --merge`` puts it in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from benchmarks.scale import _tree_cpu

PARTNERS = (9, 30)
ROUNDS = 11  # the first is start-up; the median of the others is reported
PAYLOAD = {f"slot{i}/label_model.half{h}.{p}": (173 if p == "weight" else 1) for i in range(3) for h in (0, 1)
           for p in ("weight", "bias")}  # fmt: skip

client_app = ClientApp()


def _arrays() -> ArrayRecord:
    return ArrayRecord({name: Array(np.zeros(size, dtype=np.float32)) for name, size in PAYLOAD.items()})


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    del context
    return Message(RecordDict({"arrays": _arrays(), "config": ConfigRecord({"rows": 1000})}), reply_to=msg)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    del context
    return Message(RecordDict({"config": ConfigRecord({"auc": 0.5})}), reply_to=msg)


def _exchange(grid: Grid, messages: list[Message]) -> list[Message]:
    """Push ``messages`` and poll for every reply every 0.02 s, as ``fedpersona simulate`` does."""
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        if waiting:
            time.sleep(0.02)
    return replies


def _server(seconds: list[float], cpu: list[float], partners: int) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        del context
        while len(nodes := sorted(grid.get_node_ids())) < partners:  # until every SuperNode is registered
            time.sleep(0.05)
        for _ in range(ROUNDS):
            began, used = time.perf_counter(), _tree_cpu(os.getpid())
            for kind in ("train", "evaluate"):
                content = {"arrays": _arrays()} if kind == "train" else {}
                messages = [Message(RecordDict(content), dst_node_id=n, message_type=kind) for n in nodes]
                replies = _exchange(grid, messages)
                if len(replies) != len(nodes) or any(r.has_error() for r in replies):
                    raise RuntimeError(f"{kind}: {sum(r.has_error() for r in replies)} error(s) of {len(replies)}")
            seconds.append(time.perf_counter() - began)
            cpu.append(_tree_cpu(os.getpid()) - used)

    return server


def round_seconds(partners: int) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds (this process and its descendants) of each round of a
    no-work federation of ``partners``."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    seconds: list[float] = []
    cpu: list[float] = []
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=_server(seconds, cpu, partners), client_app=client_app, num_supernodes=partners,
        backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}},  # type: ignore[arg-type]
    )  # fmt: skip
    if len(seconds) != ROUNDS:
        raise RuntimeError(f"the no-work federation ran {len(seconds)} of {ROUNDS} rounds")
    return seconds, cpu


def run(*, quick: bool) -> dict[str, Any]:
    del quick
    rows = []
    data = {}
    for partners in PARTNERS:
        seconds, cpu = round_seconds(partners)
        wall, used = statistics.median(seconds[1:]), statistics.median(cpu[1:])
        rows.append([partners, 2 * partners, round(seconds[0], 2), round(wall, 3), round(used, 3),
                     round(used / partners * 1e3, 1)])  # fmt: skip
        data[partners] = {"round_seconds": seconds, "cpu_seconds": cpu}
    return {
        "title": "Flower's floor per round",
        "tables": [
            {
                "name": "A ClientApp that does no work: one train and one evaluate message per partner a round",
                "columns": [
                    "partners",
                    "messages a round",
                    "round 1 s (start-up)",
                    "s / round (median, rounds 2+)",
                    "CPU s per round (tree)",
                    "CPU ms per partner a round",
                ],
                "rows": rows,
            }
        ],
        "notes": [
            f"{ROUNDS} rounds; flwr.simulation.run_simulation with client resources num_cpus 1.0 (as "
            "fedpersona simulate), replies of the label model's size (three slots, 2,076 float32) to train "
            "messages, replies polled every 0.02 s (as fedpersona simulate polls).",
            "CPU: user + system seconds of this process and all its descendants (Ray's processes, every thread) "
            "over each round, from /proc; the median of rounds 2+. Most of a round's wall time is waiting: Flower's "
            "simulation engine hands messages to the ClientApps from a loop that sleeps 0.1 s between passes.",
            "In the scale table above, one partner's local work at 1,000 rows (one round of the label model and "
            "its evaluation) is about 10 ms of one core.",
        ],
        "data": data,
    }


if __name__ == "__main__":
    from benchmarks.report import print_section

    print_section(run(quick=False))
