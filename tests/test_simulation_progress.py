"""``fedpersona simulate``'s progress lines and its lazily built ClientApp, without Ray.

The observed grid is driven by a push/pull grid whose replies arrive after a set number of
pulls (or never), so the lines it writes and the replies it hands back can be checked exactly.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from ray import cloudpickle

from fedpersona import simulation
from fedpersona.simulation import phase_text


class SlowGrid:
    """Replies to node ``n`` after ``delays[n]`` pulls (None: never); records the pulls."""

    def __init__(self, delays: dict[int, int | None]) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        for attr, value in (("run_id", 1), ("node_id", 1), ("task_id", 1)):
            if getattr(TaskIdentity, "_" + attr) is None:
                setattr(TaskIdentity, attr, value)
        self.delays = delays
        self.pending: dict[str, tuple[Message, int | None]] = {}
        self.pulls = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.pending[msg.metadata.message_id] = (msg, self.delays[msg.metadata.dst_node_id])
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        out = []
        for mid in list(message_ids):
            msg, delay = self.pending[mid]
            if delay is not None and self.pulls >= delay:
                reply = Message(RecordDict(), reply_to=msg)
                out.append(reply)
                del self.pending[mid]
        return out

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.delays)


def _send(grid: Any, kind: str, group: str, nodes: Iterable[int], timeout: float | None) -> list[Message]:
    messages = [Message(RecordDict(), dst_node_id=n, message_type=kind, group_id=group) for n in nodes]
    return list(grid.send_and_receive(messages, timeout=timeout))


def test_each_exchange_is_shown_when_sent_when_first_answered_and_when_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulation.time, "sleep", lambda _: None)
    inner = SlowGrid({11: 3, 12: 1, 13: 5})
    lines: list[str] = []
    grid = simulation._observed(inner, lines.append, started=simulation.time.monotonic(), rounds=5)  # type: ignore[arg-type]
    replies = _send(grid, "train", "2", [11, 12, 13], timeout=None)
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 12, 13]
    assert inner.pulls == 5  # it waited for the last one, and no longer
    texts = [line.split("] ", 1)[1] for line in lines]
    assert texts[0] == "round 2: 3 partners train..."
    assert texts[1].startswith("round 2: 3 partners train: first answer after ")
    assert texts[-1].startswith("round 2: 3 partners train: 3 answered in ")
    assert all(line.startswith("[") and line.index("s] ") > 0 for line in lines)
    assert list(grid.get_node_ids()) == [11, 12, 13]


def test_a_partner_that_never_answers_ends_the_exchange_at_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulation.time, "sleep", lambda _: None)
    inner = SlowGrid({1: 1, 2: None})
    lines: list[str] = []
    grid = simulation._observed(inner, lines.append, started=0.0, rounds=3)  # type: ignore[arg-type]
    replies = _send(grid, "query", "0", [1, 2], timeout=0.2)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert (
        lines[-1]
        .split("] ", 1)[1]
        .startswith("admission: 2 partners load their data and fix their privacy plans: 1 answered in ")
    )
    assert _send(grid, "query", "0", [], timeout=1.0) == [] and len(lines) == 3  # nothing sent, nothing shown


@pytest.mark.parametrize(
    "kind,group,n,expected",
    [
        ("query", "0", 9, "admission: 9 partners load their data and fix their privacy plans"),
        ("train", "1", 9, "round 1: 9 partners train"),
        ("evaluate", "5", 3, "round 5: 3 partners evaluate"),
        ("query.persona_release", "6", 9, "personas: release 1 at 9 partners"),
        ("query.persona_release", "12", 9, "personas: release 7 at 9 partners"),
        ("query.persona_release_secagg", "7", 4, "personas: masked release 2 at 4 partners"),
        ("query.personas", "12", 9, "personas: 9 partners assign their users and write their persona cards"),
        ("query.status", "status", 9, "9 partners report their final epsilon"),
        ("query.secagg_setup", "3", 4, "round 3: secagg setup at 4 partners"),
        ("query.final_model", "final", 2, "final model: 2 partners"),
    ],
)
def test_phase_text_names_the_stage(kind: str, group: str, n: int, expected: str) -> None:
    assert phase_text(kind, group, n, rounds=5) == expected


def test_the_partner_app_is_built_in_the_process_that_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedpersona.federation.client_app as client_app

    built: list[str] = []
    seen: list[tuple[Message, Context]] = []

    def build(run_dir: str | None = None) -> Any:
        built.append(str(run_dir))
        return lambda message, context: seen.append((message, context)) or message

    monkeypatch.setattr(client_app, "build_client_app", build)
    app = simulation._client_app("/runs/x")
    travelled = cloudpickle.loads(cloudpickle.dumps(app))  # what Ray ships to each actor
    assert travelled.app is None and travelled.run_dir == "/runs/x"
    message, context = object(), object()
    assert travelled(message, context) is message
    assert travelled(message, context) is message
    assert built == ["/runs/x"] and seen == [(message, context)] * 2  # built once, then reused
    again = cloudpickle.loads(cloudpickle.dumps(travelled))
    assert again.app is None  # a built app never travels


def test_the_driver_does_not_import_the_partner_side() -> None:
    code = (
        "import sys\n"
        "from fedpersona.simulation import _client_app\n"
        "_client_app('/runs/x')\n"
        "print(sorted(m for m in ('torch', 'opacus', 'fedpersona.federation.client_app') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
