"""`fedpersona server start` on loopback: Ctrl-C stops the SuperLink and everything below it,
and the run folder it leaves can be resumed only with ``--resume``. The helpers here are shared
with the deployment test.

The full deployment (flower-superlink with TLS and node authentication, ten partners, rogue
nodes refused, a partner and the SuperLink killed mid-run and the run resumed, the signed
model served by `fedpersona serve` and fetched by `fedpersona infer` over TLS, a tampered
artifact refused, SIGTERM to `partner start`) is one federation in
``tests/reliability/test_deploy_faults.py``, to keep the suite short.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpersona.config.files import dump_toml
from fedpersona.deploy.certs import init_federation, partner_keys
from fedpersona.deploy.processes import alive, descendants

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOOLS = ("flower-superlink", "flower-supernode", "flwr", "flower-superexec", "flwr-serverapp", "flwr-clientapp")
MISSING = [t for t in TOOLS if shutil.which(t, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}") is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"Flower executables not installed: {', '.join(MISSING)}"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    family = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in family + descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_server_start_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    creds = init_federation(out=tmp_path / "credentials", hosts=["localhost"])
    key = partner_keys("shop-1", out=tmp_path / "keys")
    federation = tmp_path / "federation.toml"
    dump_toml(
        federation,
        {
            "server": {"host": "127.0.0.1", "port": _free_port(), "run_dir": "run",
                       "credentials": str(creds.ca_cert.parent), "app": str(REPO), "expected_partners": 1,
                       "wait_timeout": 600.0},
            "federation": {"rounds": 1, "min_partners": 1},
            "partners": [{"name": "shop-1", "public_key": str(key.public_key)}],
        },
    )  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedpersona.cli", "server", "start", "--config", str(federation)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while "started run" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1.0)
        assert "started run" in log.read_text(), log.read_text()
        # The ServerApp's progress reaches the console (through RUN_DIR/logs/federation.log).
        while "0 of 1 partners connected, waiting up to" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(1.0)
        assert "0 of 1 partners connected, waiting up to" in log.read_text(), log.read_text()
        assert "0 of 1 partners connected" in (tmp_path / "run" / "logs" / "federation.log").read_text()
        assert "\x1b" not in (tmp_path / "run" / "logs" / "superlink.log").read_text()
        assert not (tmp_path / "run" / "keys" / "model-signing.key").exists()
        family = descendants(proc.pid)  # flower-superlink, flower-superexec, flwr-serverapp
        assert len(family) >= 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert not [pid for pid in family if alive(pid)]
        assert "stopping the SuperLink" in log.read_text()
        # The run folder can be resumed, and only with --resume.
        again = subprocess.run(
            [sys.executable, "-m", "fedpersona.cli", "server", "start", "--config", str(federation)],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert again.returncode == 2 and "--resume" in again.stderr
    finally:
        _stop(proc)
