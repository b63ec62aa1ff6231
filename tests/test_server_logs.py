"""fedpersona's log records in a deployed ServerApp: flwr-serverapp uploads only what the process
writes to stdout/stderr, and Python's fallback handler prints WARNING and above only."""

from __future__ import annotations

import logging

import pytest

from fedpersona.federation.server_app import forward_logs_to_flower


def test_forwarded_server_logs_reach_stderr_once_from_info_up(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("fedpersona")
    saved = (list(log.handlers), log.level, log.propagate)
    try:
        forward_logs_to_flower()
        forward_logs_to_flower()  # idempotent: one handler, each line once
        server = logging.getLogger("fedpersona.federation.server_app")
        server.info("final model installed at 3 of 3 partner(s)")
        server.debug("a debug line")
        err = capsys.readouterr().err
        assert err.count("final model installed at 3 of 3 partner(s)") == 1
        assert "INFO fedpersona.federation.server_app: final model installed" in err
        assert "a debug line" not in err
    finally:
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])
        log.propagate = saved[2]
