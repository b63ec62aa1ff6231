"""DP training speed: a DP-SGD round of the default model against a non-private round.

``python -m benchmarks.dp_speed [--quick]`` prints the tables; ``PYTHONPATH=$PWD python -m
benchmarks.run --only dp_speed --merge`` puts them in ``docs/benchmarks.md``.

**What is timed.** One local round of :func:`fedpersona.model.training.train_locally` (one
local epoch of Poisson batches at the expected batch size) of a fresh model on ``ROWS``
synthetic e-commerce rows held in tensors on the device: the default label model
(:mod:`fedpersona.model.linear`, plain SGD) and, for reference, the persona encoder (Adam), in
each mode:

- *non-private*: forward, backward of the mean loss, optimizer step;
- *bookkeeping* (the default DP mode): the ledger charge (with its epsilon), then per step the
  secret Poisson draw, book-keeping per-sample clipping (one backward for the encoder; for
  the label model the same sums in closed form, with no autograd), the secret noise and the
  accountant's record, then the accountant check;
- *ghost*: the same accounting around Opacus' ghost clipping (two backward passes) with the
  secret noise, for reference.

Everything the product pays for a private round is inside the timed call, epsilon bookkeeping
included; the per-step time is the round time over its steps. The modes run interleaved in one
process, one round each per repeat, so load changes on the shared machine hit them alike; the
ratio is the median over repeats of each repeat's private / non-private time (the two rounds
ran seconds apart). The fixed costs (Poisson draw, noise, ledger charge, accountant check) are
timed alone as well. On CPU torch runs on ``THREADS`` thread(s); the table says how many it
actually used.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.workload import fresh_encoder
from fedpersona.config.settings import ModelSettings, PrivacySettings, TrainingSettings, sample_rate_for
from fedpersona.data.dense import dense_views
from fedpersona.data.features import FeatureTensors, featurize
from fedpersona.data.synthetic import generate_silo
from fedpersona.model.encoder import PersonaEncoder
from fedpersona.model.linear import HALF, LABEL_INPUT, LabelModel
from fedpersona.model.training import check_accounting, train_locally
from fedpersona.privacy.accounting import merge_history
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.randomness import SecretRandomness

KIND, ROWS = "ecommerce", 20_000
BATCH_SIZES = (256, 1024)
MODES = ("non-private", "bookkeeping", "ghost")
THREADS = 1  # on CPU: the shared benchmark machine's cores are contended, more threads only add jitter
SIGMA = 1.0  # the noise level does not change the cost
TARGET = 1.5  # default DP step / non-private step


MODELS = ("label model", "encoder")


def fresh_model(data: FeatureTensors, model: str, device: torch.device) -> LabelModel | PersonaEncoder:
    """A fresh label model (the default) or persona encoder for ``data``."""
    if model == "label model":
        width = int(data.tensors[LABEL_INPUT].shape[1])
        return LabelModel(width, len(data.layout.label_names), ModelSettings()).to(device)
    return fresh_encoder(data, device=device.type)


def round_seconds(
    data: FeatureTensors, *, mode: str, batch_size: int, device: torch.device, state: Path, model: str = MODELS[0]
) -> float:
    """Wall time of one ``train_locally`` round of a fresh model (a fresh ledger for a private one)."""
    private = mode != "non-private"
    settings = TrainingSettings(
        sample_rate=None,
        optimizer="sgd" if model == "label model" else "adam",
        lr=2.0 if model == "label model" else 0.01,
        local_epochs=1,
        batch_size=batch_size,
        grad_sample_mode=mode if private else "bookkeeping",
        device=device.type,
    )
    # A generous target: the benchmark times steps, it does not spend a real budget.
    privacy = PrivacySettings(target_epsilon=1e3 if private else float("inf"))
    trained = fresh_model(data, model, device)
    ledger = PrivacyLedger(state / f"{mode}-{time.perf_counter_ns()}", settings=privacy) if private else None
    randomness = SecretRandomness.from_seed(0, mode, batch_size)  # benchmark: reproducible on purpose
    _synchronize(device)
    start = time.perf_counter()
    train_locally(
        model=trained, data=data, settings=settings, privacy=privacy, noise_multiplier=SIGMA if private else None,
        ledger=ledger, round=1, randomness=randomness,
    )  # fmt: skip
    _synchronize(device)
    return time.perf_counter() - start


def fixed_costs(
    data: FeatureTensors, *, batch_size: int, device: torch.device, state: Path, repeats: int, model: str = MODELS[0]
) -> list[Any]:
    """Median ms of each fixed cost: per step the secret Poisson draw (index to the device) and
    the secret noise for every parameter; per round the ledger charge and the accountant check."""
    parameters = sum(p.numel() for p in fresh_model(data, model, torch.device("cpu")).parameters())
    q = sample_rate_for(len(data), batch_size)
    steps = TrainingSettings(sample_rate=None, optimizer="adam", local_epochs=1, batch_size=batch_size).steps_per_round(
        len(data)
    )
    randomness = SecretRandomness.from_seed(0, "fixed-costs")
    reference = torch.empty(parameters, device=device)
    privacy = PrivacySettings(target_epsilon=1e3)

    def charge_and_check() -> tuple[float, float]:
        ledger = PrivacyLedger(state / f"fixed-{time.perf_counter_ns()}", settings=privacy)
        began = time.perf_counter()
        ledger.charge(round=1, mechanism="dp-sgd", noise_multiplier=SIGMA, sample_rate=q, steps=steps)
        charged = time.perf_counter()
        engine = _Engine(merge_history(ledger.history))
        check_accounting(engine, ledger, privacy.delta)  # type: ignore[arg-type]
        return charged - began, time.perf_counter() - charged

    draw = _median_seconds(lambda: torch.from_numpy(randomness.poisson_sample(len(data), q)).to(device), 50, device)
    noise = _median_seconds(lambda: randomness.normal_like(reference, SIGMA), 50, device)
    accounting = [charge_and_check() for _ in range(repeats)]
    return [
        model,
        batch_size,
        steps,
        parameters,
        round(draw * 1e3, 3),
        round(noise * 1e3, 3),
        round(statistics.median(a for a, _ in accounting) * 1e3, 1),
        round(statistics.median(b for _, b in accounting) * 1e3, 2),
    ]


class _Engine:
    """What :func:`check_accounting` reads of a privacy engine: its accountant's history."""

    def __init__(self, history: list[tuple[float, float, int]]) -> None:
        self.accountant = type("Accountant", (), {"history": history})()


def _median_seconds(work: Callable[[], object], times: int, device: torch.device) -> float:
    seconds = []
    for _ in range(times):
        _synchronize(device)
        start = time.perf_counter()
        work()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(*, quick: bool) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(THREADS)
    try:
        return _run(quick=quick, device=device)
    finally:
        torch.set_num_threads(threads)


def _run(*, quick: bool, device: torch.device) -> dict[str, Any]:
    repeats = 3 if quick else 7
    used_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    table = generate_silo(KIND, ROWS, seed=0).table
    data = featurize(table)
    data.tensors[LABEL_INPUT] = torch.from_numpy(np.ascontiguousarray(dense_views(table).label))
    data.tensors[HALF] = torch.from_numpy(np.random.default_rng(0).integers(0, 2, size=ROWS))
    data = FeatureTensors(layout=data.layout, tensors={k: v.to(device) for k, v in data.tensors.items()})
    parameters = {m: sum(p.numel() for p in fresh_model(data, m, torch.device("cpu")).parameters()) for m in MODELS}
    rows: list[list[Any]] = []
    costs: list[list[Any]] = []
    raw: list[dict[str, Any]] = []
    ratios: dict[tuple[str, str], list[float]] = {(m, mode): [] for m in MODELS for mode in MODES[1:]}
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        state = Path(folder)
        for model in MODELS:
            for batch in BATCH_SIZES:
                steps = TrainingSettings(sample_rate=None, local_epochs=1, batch_size=batch).steps_per_round(ROWS)
                for mode in MODES:  # warm-up: lazy initialisation stays out of the timings
                    round_seconds(data, mode=mode, batch_size=batch, device=device, state=state, model=model)
                seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
                for _ in range(repeats):
                    for mode in MODES:
                        seconds[mode].append(
                            round_seconds(data, mode=mode, batch_size=batch, device=device, state=state, model=model)
                        )
                paired = {
                    mode: statistics.median(s / b for s, b in zip(seconds[mode], seconds["non-private"], strict=True))
                    for mode in MODES
                }
                for mode in MODES:
                    median = statistics.median(seconds[mode])
                    rows.append(
                        [model, batch, mode, steps, round(median * 1e3 / steps, 2), round(min(seconds[mode]), 3),
                         round(ROWS / median), round(paired[mode], 2)]
                    )  # fmt: skip
                    raw.append(
                        {
                            "model": model,
                            "batch_size": batch,
                            "mode": mode,
                            "steps": steps,
                            "round_seconds": seconds[mode],
                        }
                    )
                    if mode != "non-private":
                        ratios[(model, mode)].append(paired[mode])
                costs.append(
                    fixed_costs(data, batch_size=batch, device=device, state=state, repeats=repeats, model=model)
                )
    load_after = os.getloadavg()
    dp, ghost = ratios[("label model", "bookkeeping")], ratios[("label model", "ghost")]
    encoder_dp, encoder_ghost = ratios[("encoder", "bookkeeping")], ratios[("encoder", "ghost")]
    return {
        "title": "DP training speed",
        "tables": [
            {
                "name": f"One local round (1 epoch), {ROWS:,} synthetic {KIND} rows: the default label model "
                f"({parameters['label model']:,} parameters) and the encoder ({parameters['encoder']:,}), "
                f"{device.type}, {used_threads} torch thread(s)",
                "columns": [
                    "model",
                    "batch",
                    "mode",
                    "steps",
                    "ms per step (median round / steps)",
                    "round seconds (best)",
                    "samples/s (median)",
                    "time / non-private (median of paired repeats)",
                ],
                "rows": rows,
            },
            {
                "name": "Fixed costs inside a private round (median ms; the first two per step, the others per round)",
                "columns": [
                    "model",
                    "batch",
                    "steps",
                    "parameters",
                    "secret Poisson draw + index to device",
                    "secret noise",
                    "ledger charge (with its epsilon)",
                    "accountant check",
                ],
                "rows": costs,
            },
        ],
        "notes": [
            f"{repeats} repeats per mode after one warm-up round each, modes interleaved in one process; noise "
            f"multiplier {SIGMA}, max_grad_norm {PrivacySettings().max_grad_norm} (the cost does not depend on it), "
            "PRV accountant; plain SGD for the label model, Adam for the encoder. Load average (1 min) "
            f"{load_before[0]:.2f} "
            f"before, {load_after[0]:.2f} after, on {os.cpu_count()} cores; torch used {used_threads} thread(s).",
            f"Target: the default model's DP step (bookkeeping) <= {TARGET}x the non-private step, epsilon "
            f"bookkeeping included: measured {min(dp):.2f}x-{max(dp):.2f}x for the label model "
            f"({'met' if max(dp) <= TARGET else 'not met'} on this machine; Opacus' ghost clipping "
            f"{min(ghost):.2f}x-{max(ghost):.2f}x); the encoder {min(encoder_dp):.2f}x-{max(encoder_dp):.2f}x "
            f"(ghost {min(encoder_ghost):.2f}x-{max(encoder_ghost):.2f}x).",
            "Every mode is exact per-sample clipping: bookkeeping and ghost hand Adam the same gradients "
            "(tests/test_privacy.py); bookkeeping equals one-row-at-a-time clipping on every layer of the encoder "
            "(tests/test_clipping.py) and on the label model, whose closed-form sums also equal the generic "
            "book-keeping path's (tests/test_linear_model.py). Each step gathers only the tensors the model reads "
            "(the label model: its dense view, halves and labels), in both modes.",
        ],
        "data": {
            "rows": ROWS,
            "kind": KIND,
            "parameters": parameters,
            "repeats": repeats,
            "torch_threads": used_threads,
            "device": device.type,
            "load_average_before": list(load_before),
            "load_average_after": list(load_after),
            "runs": raw,
        },
    }


def main() -> None:
    import sys

    result = run(quick="--quick" in sys.argv[1:])
    for table in result["tables"]:
        print(table["name"])
        print(" | ".join(table["columns"]))
        for row in table["rows"]:
            print(" | ".join(str(cell) for cell in row))
        print()
    for note in result["notes"]:
        print(note)


if __name__ == "__main__":
    main()
