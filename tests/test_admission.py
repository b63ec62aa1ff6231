"""The coordinator's wait for partners: a window that partners' arrivals extend, bounded, with
progress in the log; driven by a fake clock (nothing sleeps) and the in-process fake grid."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedpersona.config.settings import FederationConfig, FederationSettings, ServerNetwork
from fedpersona.errors import ConfigError
from fedpersona.federation.roster import AdmissionWindow, Clock, wait_for_nodes
from fedpersona.federation.server_app import ServerSettings, run_federation, server_settings
from tests.fake_grid import MODEL, TRAINING, FakeGrid, ScriptedPartner


class Staggered:
    """A fake clock and the nodes that come online at given seconds of it."""

    def __init__(self, grid: FakeGrid, arrivals: dict[int, float]) -> None:
        self.t = 0.0
        self.grid, self.arrivals = grid, arrivals
        self.slept = 0.0
        self._update()

    def _update(self) -> None:
        self.grid.offline = {n for n, at in self.arrivals.items() if at > self.t}

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.t += seconds
        self.slept += seconds
        self._update()

    @property
    def clock(self) -> Clock:
        return Clock(now=self.now, sleep=self.sleep)


def _grid(count: int) -> FakeGrid:
    return FakeGrid({10 + i: ScriptedPartner(f"shop-{i}", "ecommerce", 100) for i in range(count)})


def test_arrivals_extend_the_window_until_everyone_is_there(caplog: pytest.LogCaptureFixture) -> None:
    # Eight partners, one every 100 s (each slow to start): a fixed 150 s window would have
    # stopped at two; each arrival gives the others 120 s more.
    grid = _grid(8)
    fake = Staggered(grid, {10 + i: 100.0 * i for i in range(8)})
    window = AdmissionWindow(initial=150.0, extension=120.0, maximum=3600.0, progress_every=30.0)
    with caplog.at_level(logging.INFO, logger="fedpersona.federation.roster"):
        arrived = wait_for_nodes(grid, 8, window, clock=fake.clock)
    assert arrived.nodes == list(range(10, 18))
    assert arrived.waited == pytest.approx(700.0)
    assert "1 of 8 partners connected, waiting up to 150s more" in caplog.text
    assert "2 of 8 partners connected, waiting up to 120s more" in caplog.text
    assert "7 of 8 partners connected, waiting up to 120s more" in caplog.text
    assert "8 of 8 partners connected after 700s" in caplog.text


def test_the_wait_never_passes_max_wait() -> None:
    grid = _grid(20)
    fake = Staggered(grid, {10 + i: 100.0 * i for i in range(20)})
    window = AdmissionWindow(initial=150.0, extension=120.0, maximum=450.0)
    arrived = wait_for_nodes(grid, 20, window, clock=fake.clock)
    assert arrived.waited == pytest.approx(450.0)
    assert arrived.deadline == pytest.approx(450.0)
    assert arrived.nodes == list(range(10, 15))  # online at 0, 100, 200, 300, 400 s


def test_without_arrivals_the_wait_is_the_window_with_progress_lines(caplog: pytest.LogCaptureFixture) -> None:
    grid = _grid(3)
    fake = Staggered(grid, {10: 0.0, 11: 1e9, 12: 1e9})
    window = AdmissionWindow(initial=100.0, extension=120.0, maximum=3600.0, progress_every=30.0)
    with caplog.at_level(logging.INFO, logger="fedpersona.federation.roster"):
        arrived = wait_for_nodes(grid, 3, window, clock=fake.clock)
    assert arrived.nodes == [10]
    assert arrived.waited == pytest.approx(120.0)  # the one arrival at 0 s extended 100 s to 120 s
    lines = [r.getMessage() for r in caplog.records if "1 of 3 partners connected" in r.getMessage()]
    assert lines[0] == "1 of 3 partners connected, waiting up to 120s more (each new partner extends the wait)"
    assert lines[1:] == [
        "1 of 3 partners connected, waiting up to 90s more (each new partner extends the wait)",
        "1 of 3 partners connected, waiting up to 60s more (each new partner extends the wait)",
        "1 of 3 partners connected, waiting up to 30s more (each new partner extends the wait)",
    ]


def test_too_few_partners_is_one_clear_error_without_sleeping(tmp_path: Path) -> None:
    grid = _grid(3)
    fake = Staggered(grid, {10: 0.0, 11: 1e9, 12: 1e9})
    fed = FederationSettings(rounds=1, min_partners=2, personas=0)
    settings = ServerSettings(
        federation=fed, model=MODEL, training=TRAINING, run_dir=str(tmp_path / "run"), expected_partners=3,
        wait_timeout=600.0, wait_extension=60.0, max_wait=900.0,
    )  # fmt: skip
    with pytest.raises(ConfigError) as err:
        run_federation(grid, settings, clock=fake.clock)
    text = str(err.value)
    assert text.startswith("only 1 of 3 partner(s) connected after waiting 600s (server.wait_timeout 600s")
    assert "server.max_wait 900s" in text and "federation.min_partners is 2" in text
    assert "logs/supernode.log" in text
    assert fake.slept == pytest.approx(600.0)
    assert grid.sent == []  # nobody was asked anything


def test_enough_but_not_all_partners_start_the_run_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    grid = _grid(3)
    fake = Staggered(grid, {10: 0.0, 11: 5.0, 12: 1e9})
    fed = FederationSettings(rounds=1, min_partners=2, personas=0)
    settings = ServerSettings(
        federation=fed, model=MODEL, training=TRAINING, run_dir=str(tmp_path / "run"), expected_partners=3,
        wait_timeout=60.0, wait_extension=10.0, max_wait=100.0,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fedpersona"):
        result = run_federation(grid, settings, clock=fake.clock)
    assert result.rounds_completed == 1
    assert "starting with 2 of 3 expected partner(s) after 60s" in caplog.text


def test_admission_settings_are_validated_and_reach_the_server_settings() -> None:
    with pytest.raises(ConfigError, match=r"server.max_wait \(100\) must be >= server.wait_timeout \(600\)"):
        ServerNetwork.checked(max_wait=100.0)
    with pytest.raises(ConfigError, match=r"server.wait_extension: must be >= 0"):
        ServerNetwork.checked(wait_extension=-1.0)
    cfg = FederationConfig(server=ServerNetwork(wait_timeout=300.0, wait_extension=45.0, max_wait=1200.0))
    window = server_settings(cfg).admission
    assert (window.initial, window.extension, window.maximum, window.progress_every) == (300.0, 45.0, 1200.0, 30.0)
    with pytest.raises(ValueError, match="maximum"):
        AdmissionWindow(initial=10.0, maximum=5.0)


def test_the_superlink_listens_on_loopback_unless_told_otherwise() -> None:
    assert ServerNetwork().host == "127.0.0.1"
    assert ServerNetwork(host="0.0.0.0").host == "0.0.0.0"
