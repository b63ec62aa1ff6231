"""`fedpersona simulate` without --verbose: the engines' warnings a user cannot act on stay off
the console, in this process and in the worker processes Ray starts (which inherit the
environment); with --verbose everything shows; afterwards everything is as before."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest

from fedpersona.cli.app import quiet_engines

# What a Ray worker does: Opacus warns about its generator, Flower logs an actor's end.
WORKER = """
import logging, warnings
warnings.warn("Secure RNG turned off. This is perfectly fine for experimentation", UserWarning, stacklevel=1)
warnings.warn("a warning nobody filtered", UserWarning, stacklevel=1)
from flwr.common.logger import log
log(logging.WARNING, "Manually terminating %s", "ClientAppActor")
log(logging.ERROR, "an engine error")
"""


def _worker() -> str:
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("FLWR_LOG_LEVEL", "PYTHONWARNINGS"):
        monkeypatch.delenv(name, raising=False)
    yield


def test_without_verbose_workers_hide_the_engines_notices_but_not_errors(clean_env: None) -> None:
    with quiet_engines(verbose=False):
        err = _worker()
    assert "Secure RNG turned off" not in err
    assert "Manually terminating ClientAppActor" not in err
    assert "a warning nobody filtered" in err
    assert "an engine error" in err


def test_with_verbose_everything_shows(clean_env: None) -> None:
    with quiet_engines(verbose=True):
        err = _worker()
    assert "Secure RNG turned off" in err
    assert "Manually terminating ClientAppActor" in err


def test_the_users_own_choices_are_kept_and_everything_restored_afterwards(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    opacus = logging.getLogger("opacus")
    before = (opacus.level, logging.getLogger("flwr").propagate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        with quiet_engines(verbose=False):
            assert os.environ["FLWR_LOG_LEVEL"] == "DEBUG"
            assert os.environ["PYTHONWARNINGS"].split(",") == [
                "default",
                "ignore:Secure RNG turned off:UserWarning",
                "ignore:Full backward hook is firing:UserWarning",
                "ignore:Optimal order is the:UserWarning",
            ]
            assert opacus.level == logging.ERROR and logging.getLogger("flwr").propagate is False
            warnings.warn("Secure RNG turned off. Fine for experimentation", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
        warnings.warn("Secure RNG turned off. After the run", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else", "Secure RNG turned off. After the run"]
    assert os.environ["PYTHONWARNINGS"] == "default"
    assert (opacus.level, logging.getLogger("flwr").propagate) == before
