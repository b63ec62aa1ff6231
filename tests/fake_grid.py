"""The one in-process stand-in for Flower's Grid, and cheap scripted partners, to drive
:func:`fedpersona.federation.server_app.run_federation` round by round without Ray or processes.

:class:`FakeGrid` delivers each message to a responder per node: a :class:`ScriptedPartner`, or
fedpersona's real ClientApp on a partner's :class:`~flwr.app.Context`
(:func:`client_app_nodes`, with :func:`partner_context` writing the partner's client.toml).

A :class:`ScriptedPartner` answers like fedpersona's ClientApp (same record names and
keys) with deterministic updates, so that two runs given the same messages end with the same
global model bit for bit; it keeps its own "ledger" (the rounds it was charged for).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedpersona.config.settings import ModelSettings, TrainingSettings
from fedpersona.federation.messages import decode_arrays, encode_arrays

NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE

MODEL = ModelSettings(architecture="encoder", token_dim=8, embed_dim=8, hidden=8, blocks=1)
TRAINING = TrainingSettings(batch_size=32, local_epochs=1, sample_rate=None, optimizer="adam", lr=0.01)


PERSONA_WIDTH = 6


def _release(x: np.ndarray, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A noiseless persona release of rows ``x`` for the request in ``config`` and ``arrays``."""
    from fedpersona.personas.mixture import stats_release
    from fedpersona.personas.protocol import personas_from_arrays
    from fedpersona.personas.space import gram_release

    if config["persona.kind"] == "gram":
        clip, offset = float(config["persona.row_clip"]), float(config["persona.offset"])
        return {"gram": gram_release(x, clip=clip, offset=offset, noise_multiplier=0.0, randomness=None)}
    space, mixture = personas_from_arrays(arrays, metric=str(config["persona.metric"]))
    stats = stats_release(
        space.embed(x), mixture, soft=bool(config["persona.soft"]), z_clip=space.z_clip, noise_multiplier=0.0,
        count_noise=float(config["persona.count_noise"]), randomness=None,
    )  # fmt: skip
    return {"counts": stats.counts, "sums": stats.sums}


class ServerCrash(RuntimeError):
    """Raised by the grid to stop the ServerApp at a chosen message, like a killed process."""


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


@dataclass
class ScriptedPartner:
    """A partner whose update is the received model plus a fixed, seeded step."""

    name: str
    kind: str
    train_rows: int
    fingerprint: str = "f00d"
    epsilon_per_round: float = 0.25
    charged: list[int] = field(default_factory=list)  # rounds charged to its "ledger"
    received: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # round -> arrays
    log: list[tuple[str, int]] = field(default_factory=list)  # (message type, round)
    model: dict[str, bytes] | None = None  # the final model's files, once delivered

    @property
    def epsilon(self) -> float:
        return self.epsilon_per_round * len(self.charged)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "fingerprint": self.fingerprint, "schema_version": 1,
            "rows": self.train_rows, "private": True, "epsilon": self.epsilon,
            "noise_multiplier": 1.0, "sample_rate": 0.1, "steps_per_round": 3, "planned_rounds": 3,
            "target_epsilon": 3.0, "delta": 1e-5, "accountant": "prv", "max_grad_norm": 1.0,
            "share_eval_metrics": False, "persona_width": PERSONA_WIDTH, "gram_noise": 0.0, "em_noise": 0.0,
        }  # fmt: skip

    def rows(self) -> np.ndarray:
        """Its persona view: four groups in PERSONA_WIDTH columns, the same for every run."""
        rng = np.random.default_rng(_seed(self.name, "rows"))
        centres = np.random.default_rng(_seed(self.kind, "centres")).normal(0, 2.0, (4, PERSONA_WIDTH))
        groups = rng.integers(0, 4, self.train_rows)
        return centres[groups] + rng.normal(0, 0.3, (self.train_rows, PERSONA_WIDTH))

    def update(self, received: dict[str, np.ndarray], rnd: int) -> dict[str, np.ndarray]:
        out = {
            k: (v + np.random.default_rng(_seed(self.name, rnd, k)).normal(0, 0.05, v.shape)).astype(v.dtype)
            for k, v in received.items()
        }  # a step per parameter name: the order of the received arrays does not matter
        adapter = f"adapter.{self.kind}.weight"
        if adapter not in out:  # the first round: the partner's initial adapter
            out[adapter] = np.random.default_rng(_seed(self.kind)).normal(0, 0.1, (3, 4)).astype(np.float32)
        return out

    def __call__(self, msg: Message) -> RecordDict | Error:
        kind = msg.metadata.message_type
        config = dict(msg.content.config_records["config"]) if "config" in msg.content.config_records else {}
        rnd = int(config.get("round", 0))
        self.log.append((kind, rnd))
        if kind == "query":
            return RecordDict({"info": ConfigRecord(self.info())})
        if kind == "train":
            received = decode_arrays(msg.content.array_records["arrays"])
            self.received[rnd] = received
            self.charged.append(rnd)  # charged before training, as the real ledger
            arrays = self.update(received, rnd)
            if not config["adapter_shared"]:
                arrays = {k: v for k, v in arrays.items() if not k.startswith("adapter.")}
            metrics = {"num-examples": self.train_rows, "steps": 3, "sample_rate": 0.1, "epsilon": self.epsilon}
            return RecordDict({"arrays": encode_arrays(arrays), "metrics": MetricRecord(metrics)})
        if kind in ("evaluate", "query.status"):
            return RecordDict({"metrics": MetricRecord({"epsilon": self.epsilon})})
        if kind == "query.persona_release":
            self.charged.append(rnd)
            released = _release(self.rows(), config, decode_arrays(msg.content.array_records["persona"]))
            return RecordDict({"release": encode_arrays(released), "metrics": MetricRecord({"epsilon": self.epsilon})})
        if kind == "query.personas":
            return RecordDict({"metrics": MetricRecord({"epsilon": self.epsilon})})
        if kind == "query.final_model":
            record = msg.content.config_records["artifact"]
            self.model = {k: bytes(v) for k, v in record.items()}  # type: ignore[arg-type]
            return RecordDict()
        return Error(code=4001, reason=f"unexpected message {kind}")


Responder = Callable[[Message], "RecordDict | Error | Message | None"]
Rewrite = Callable[[Message, Message], Message]


def partner_context(folder: Path, node: int, config: dict[str, Any]) -> Context:
    """A partner's client.toml in ``folder`` and the Context its SuperNode would give the ClientApp."""
    from fedpersona.config.files import dump_toml

    folder.mkdir(parents=True, exist_ok=True)
    dump_toml(folder / "client.toml", config)
    return Context(
        run_id=1, node_id=node, node_config={"client-config": str(folder / "client.toml")},
        state=RecordDict(), run_config={},
    )  # fmt: skip


def client_app_nodes(contexts: dict[int, Context]) -> dict[int, Responder]:
    """fedpersona's real ClientApp, once per node, each with its own Context."""
    from fedpersona.federation.client_app import build_client_app

    app = build_client_app()
    return {node: (lambda msg, ctx=ctx: app(msg, ctx)) for node, ctx in contexts.items()}


class FakeGrid:
    """Delivers each message to the node's responder at once; records what was sent.

    ``offline`` nodes answer as the SuperLink does for a node without heartbeats (an error
    reply from the SuperLink's node id); a responder returning None sends no reply (lost).
    ``crash_at(kind, round)`` raises :class:`ServerCrash` when that message is about to go out
    after the partners already handled it (the ServerApp dies waiting for the replies).
    ``lose`` lists ``(message type, node)`` pairs whose replies never arrive; ``rewrite(msg,
    reply)`` may replace a reply before the server sees it (a hostile partner or network).
    ``messages`` and ``replies`` keep every message sent and every reply delivered.
    """

    def __init__(
        self, nodes: dict[int, Responder], *, lose: Iterable[tuple[str, int]] = (), rewrite: Rewrite | None = None
    ) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        # A ServerApp process has an identity (Flower sets it); Message() reads it.
        for attr, value in (("run_id", 1), ("node_id", 1), ("task_id", 1)):
            if getattr(TaskIdentity, "_" + attr) is None:
                setattr(TaskIdentity, attr, value)
        self.nodes = dict(nodes)
        self.offline: set[int] = set()
        self.sent: list[tuple[str, str, int]] = []  # (message type, group id, node)
        self.crash: tuple[str, str] | None = None
        self.before_send: Callable[[str, str], None] | None = None
        self.lose = set(lose)
        self.rewrite = rewrite
        self.messages: list[Message] = []
        self.replies: list[Message] = []

    def crash_at(self, kind: str, rnd: int) -> None:
        self.crash = (kind, str(rnd))

    def get_node_ids(self) -> Iterable[int]:
        return sorted(n for n in self.nodes if n not in self.offline)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if messages and self.before_send is not None:
            self.before_send(messages[0].metadata.message_type, messages[0].metadata.group_id)
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = msg.metadata.dst_node_id
            kind, group = msg.metadata.message_type, msg.metadata.group_id
            self.sent.append((kind, group, node))
            self.messages.append(msg)
            if node in self.offline or node not in self.nodes:
                reply = Message(Error(code=NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink made this reply
                replies.append(reply)
                continue
            out = self.nodes[node](msg)
            if out is None or (kind, node) in self.lose:
                continue
            reply = out if isinstance(out, Message) else Message(out, reply_to=msg)
            if self.rewrite is not None:
                reply = self.rewrite(msg, reply)
            replies.append(reply)
        self.replies.extend(replies)
        if messages and self.crash == (messages[0].metadata.message_type, messages[0].metadata.group_id):
            raise ServerCrash(f"the server died waiting for the {self.crash[0]} replies of round {self.crash[1]}")
        return replies

    def rounds_sent(self, kind: str) -> list[int]:
        """The rounds of the ``kind`` messages sent, once per round, in order."""
        out: list[int] = []
        for k, group, _ in self.sent:
            if k == kind and (not out or out[-1] != int(group)):
                out.append(int(group))
        return out
