"""The label model (fedpersona.model.linear): cross-fitting, exact clipping, DP-SGD rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedpersona.config.settings import ModelSettings, PrivacySettings, TrainingSettings
from fedpersona.data.features import FeatureTensors, layout_of
from fedpersona.data.synthetic import synthetic_schema
from fedpersona.model.linear import HALF, LABEL_INPUT, LabelModel, halves
from fedpersona.model.training import train_locally
from fedpersona.privacy.clipping import clipped_gradient_sum
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.randomness import SecretRandomness


def _batch(n: int, d: int, labels: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (torch.rand(n, labels, generator=g) < 0.4).float()
    y[torch.rand(n, labels, generator=g) < 0.2] = math.nan  # unknown labels
    return {LABEL_INPUT: x, HALF: (torch.rand(n, generator=g) < 0.5).long(), "labels": y}


def _model(d: int, labels: int, seed: int = 1) -> LabelModel:
    model = LabelModel(d, labels, ModelSettings())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_halves_are_row_local_keyed_and_balanced() -> None:
    keys = [f"user-{i}" for i in range(4000)]
    a = halves(keys, b"k" * 32)
    assert set(np.unique(a)) == {0, 1} and abs(a.mean() - 0.5) < 0.05
    # one row's half depends on that row alone: a sub-list keeps each row's half
    assert np.array_equal(halves(keys[100:200], b"k" * 32), a[100:200])
    # another key gives another split (about half the rows move)
    b = halves(keys, b"j" * 32)
    assert 0.4 < (a != b).mean() < 0.6


def test_a_row_trains_only_its_own_half() -> None:
    model = _model(5, 2)
    batch = _batch(1, 5, 2)
    batch["labels"] = torch.tensor([[1.0, 0.0]])
    for half in (0, 1):
        model.zero_grad()
        batch[HALF] = torch.tensor([half])
        model(batch).sum().backward()
        own, other = model.label_model[f"half{half}"], model.label_model[f"half{1 - half}"]
        assert own.weight.grad is not None and float(own.weight.grad.abs().sum()) > 0
        assert other.weight.grad is None or float(other.weight.grad.abs().sum()) == 0.0


def test_the_per_row_loss_is_the_binary_cross_entropy_of_known_labels() -> None:
    model = _model(4, 3)
    batch = _batch(50, 4, 3)
    loss = model(batch).detach().numpy()
    x, y, h = batch[LABEL_INPUT].numpy(), batch["labels"].numpy(), batch[HALF].numpy()
    for i in range(50):
        layer = model.label_model[f"half{h[i]}"]
        w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
        z = x[i].astype(np.float64) @ w.T + b
        known = ~np.isnan(y[i])
        want = np.sum((np.logaddexp(0.0, z) - np.nan_to_num(y[i]) * z)[known])  # minus the log-likelihood
        assert loss[i] == pytest.approx(want, rel=1e-5)


def test_out_of_sample_logits_come_from_the_other_half_and_new_rows_get_the_mean() -> None:
    model = _model(3, 1)
    batch = _batch(20, 3, 1)
    w = {h: model.label_model[f"half{h}"] for h in (0, 1)}
    z = {h: (w[h](batch[LABEL_INPUT])).detach()[:, 0] for h in (0, 1)}
    oos = model.out_of_sample_logits(batch)[:, 0]
    expect = torch.where(batch[HALF] == 0, z[1], z[0])
    assert torch.allclose(oos, expect)
    assert torch.allclose(model.logits(batch)[:, 0], (z[0] + z[1]) / 2)


def test_bookkeeping_clipping_is_exact_against_one_row_at_a_time() -> None:
    model = _model(6, 2)
    batch = _batch(40, 6, 2, seed=3)
    clip = 0.7
    got = clipped_gradient_sum(model=model, per_sample_loss=lambda: model(batch), max_grad_norm=clip)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(40):
        model.zero_grad()
        row = {k: v[i : i + 1] for k, v in batch.items()}
        model(row).sum().backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        for n in want:
            want[n] += grads[n] * factor
    for n, g in want.items():
        assert torch.allclose(got.grads[n], g, atol=1e-6), n


@pytest.mark.parametrize("clip", [0.05, 0.7, 1e6])  # every row clipped, some, none
def test_the_closed_form_clipped_sum_equals_one_row_at_a_time_and_the_generic_path(clip: float) -> None:
    model = _model(6, 3)
    batch = _batch(60, 6, 3, seed=5)
    batch["labels"][7] = math.nan  # a row with no known label: a zero gradient, clip factor 1
    got = model.clipped_sum(batch, clip)
    generic = clipped_gradient_sum(model=model, per_sample_loss=lambda: model(batch), max_grad_norm=clip)
    assert list(got.grads) == list(generic.grads)  # the same order: the noise lands on the same coordinates
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    norms = []
    for i in range(60):
        model.zero_grad()
        row = {k: v[i : i + 1] for k, v in batch.items()}
        model(row).sum().backward()
        grads = {
            n: (p.grad if p.grad is not None else torch.zeros_like(p)).double() for n, p in model.named_parameters()
        }
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
        norms.append(norm)
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        for n in want:
            want[n] += grads[n] * factor
    assert norms[7] == 0.0
    assert torch.allclose(got.norms.double(), torch.tensor(norms, dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(got.losses, model(batch).detach(), rtol=1e-6)
    for n, g in want.items():
        assert torch.allclose(got.grads[n].double(), g, atol=1e-5), n
        assert torch.allclose(got.grads[n], generic.grads[n], atol=1e-5), n


def test_a_private_round_gives_the_same_model_through_the_closed_form_and_the_generic_path(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same seeded DP-SGD round (same batches, same noise) trained once with the label
    model's closed-form clipped sum and once, with that method removed, through the generic
    book-keeping path: the two models agree to float32 rounding."""
    from pathlib import Path

    g = torch.Generator().manual_seed(2)
    n, d = 1500, 5
    layout = layout_of(synthetic_schema("finance"))
    data = FeatureTensors(
        layout,
        {
            "scalar": torch.zeros(n, 1),
            LABEL_INPUT: torch.randn(n, d, generator=g),
            HALF: (torch.rand(n, generator=g) < 0.5).long(),
            "labels": (torch.rand(n, 1, generator=g) < 0.3).float(),
        },
    )
    privacy = PrivacySettings(target_epsilon=50.0, delta=1e-5)

    def trained(where: str) -> LabelModel:
        model = _model(d, 1, seed=4)
        ledger = PrivacyLedger(Path(str(tmp_path)) / where, settings=privacy)
        train_locally(
            model=model, data=data, settings=TrainingSettings(device="cpu"), privacy=privacy, noise_multiplier=0.8,
            ledger=ledger, round=1, randomness=SecretRandomness.from_seed(9, "same"), public_rows=n,
        )  # fmt: skip
        return model

    closed = trained("closed")
    monkeypatch.delattr(LabelModel, "clipped_sum")
    generic = trained("generic")
    start = _model(d, 1, seed=4)
    for (name, a), b, s in zip(closed.named_parameters(), generic.parameters(), start.parameters(), strict=True):
        assert not torch.allclose(a, s), name  # the round moved the model
        assert torch.allclose(a, b, atol=1e-5), name


def test_private_rounds_learn_a_linear_signal_and_charge_the_ledger(tmp_path: object) -> None:
    """Three DP-SGD rounds at epsilon 3 on 4,000 rows of a planted logistic model: the
    cross-fitted out-of-sample AUC is far above chance, and the ledger holds one entry per round."""
    from pathlib import Path

    rng = np.random.default_rng(0)
    n, d = 4000, 8
    x = rng.normal(size=(n, d)).astype(np.float32) / math.sqrt(d)
    beta = rng.normal(size=d) * 3
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ beta)))).astype(np.float32)
    schema = synthetic_schema("finance")
    layout = layout_of(schema)
    tensors = {
        "scalar": torch.zeros(n, 1),
        LABEL_INPUT: torch.from_numpy(x),
        HALF: torch.from_numpy(rng.integers(0, 2, size=n)),
        "labels": torch.from_numpy(y[:, None]),
    }
    data = FeatureTensors(layout, tensors)
    model = LabelModel(d, 1, ModelSettings())
    privacy = PrivacySettings(target_epsilon=3.0, delta=1e-5)
    training = TrainingSettings(device="cpu")
    ledger = PrivacyLedger(Path(str(tmp_path)), settings=privacy)
    for rnd in (1, 2, 3):
        result = train_locally(
            model=model, data=data, settings=training, privacy=privacy, noise_multiplier=2.0, ledger=ledger,
            round=rnd, randomness=SecretRandomness.for_mechanism(None, "p", "train", rnd, 0), public_rows=n,
        )  # fmt: skip
        assert result.steps == 5 and result.sample_rate == pytest.approx(0.2)
    assert [e.round for e in ledger.entries] == [1, 2, 3]
    index = torch.arange(n)
    oos = model.out_of_sample_logits(data.batch(index))[:, 0].numpy()
    assert roc_auc_score(y, oos) > 0.75
    assert roc_auc_score(y, x @ beta) > 0.8  # the oracle's own ceiling, for scale


def test_a_label_model_without_signal_reports_no_auc() -> None:
    """Evaluation of a label model whose score carries no signal on the partner's own rows: no
    AUC is reported (label_signal 0); with a planted signal the AUC is reported."""
    from fedpersona.model.evaluation import evaluate

    rng = np.random.default_rng(1)
    n, d = 600, 4
    layout = layout_of(synthetic_schema("finance"))

    def data(x: np.ndarray, y: np.ndarray) -> FeatureTensors:
        return FeatureTensors(
            layout,
            {
                "scalar": torch.zeros(len(y), 1),
                LABEL_INPUT: torch.from_numpy(x.astype(np.float32)),
                HALF: torch.from_numpy(rng.integers(0, 2, size=len(y))),
                "labels": torch.from_numpy(y.astype(np.float32)[:, None]),
            },
        )

    x = rng.normal(size=(n, d))
    model = LabelModel(d, 1, ModelSettings())
    with torch.no_grad():
        for half in ("half0", "half1"):
            model.label_model[half].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    noise = (rng.random(n) < 0.5).astype(np.float64)
    metrics = evaluate(model=model, train=data(x, noise), test=data(x, noise))
    assert metrics["label_signal"] == 0.0 and math.isnan(metrics["label_auc"])
    planted = (x[:, 0] + rng.normal(size=n) * 0.5 > 0).astype(np.float64)
    metrics = evaluate(model=model, train=data(x, planted), test=data(x, planted))
    assert metrics["label_signal"] == 1.0 and metrics["label_auc"] > 0.8


def test_a_default_private_round_never_imports_opacus(tmp_path: object) -> None:
    """Book-keeping rounds record their steps without Opacus (a second of CPU in every deployed
    training process); the cross-check with the ledger still holds and still refuses a step
    that was not charged."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import sys, torch
        from fedpersona.config.settings import ModelSettings, PrivacySettings, TrainingSettings
        from fedpersona.data.features import FeatureTensors, layout_of
        from fedpersona.data.synthetic import synthetic_schema
        from fedpersona.model.linear import HALF, LABEL_INPUT, LabelModel
        from fedpersona.model.training import train_locally
        from fedpersona.privacy.ledger import PrivacyLedger
        from fedpersona.privacy.randomness import SecretRandomness
        n = 500
        data = FeatureTensors(layout_of(synthetic_schema("finance")), {{
            "scalar": torch.zeros(n, 1), LABEL_INPUT: torch.randn(n, 4), HALF: torch.randint(0, 2, (n,)),
            "labels": (torch.rand(n, 1) < 0.5).float()}})
        privacy = PrivacySettings(target_epsilon=3.0)
        ledger = PrivacyLedger({str(tmp_path)!r}, settings=privacy)
        result = train_locally(model=LabelModel(4, 1, ModelSettings()), data=data,
            settings=TrainingSettings(device="cpu"), privacy=privacy, noise_multiplier=2.0, ledger=ledger,
            round=1, randomness=SecretRandomness.for_mechanism(None, "p", "train", 1, 0), public_rows=n)
        print(result.epsilon == ledger.epsilon() > 0, "opacus" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["True", "False"]

    from fedpersona.model.training import StepRecord, check_accounting

    ledger = PrivacyLedger(str(tmp_path), settings=PrivacySettings(target_epsilon=3.0))  # the round above
    record = StepRecord([])
    for _ in range(5):
        record.accountant.step(noise_multiplier=2.0, sample_rate=0.2)
    assert check_accounting(record, ledger, 1e-5) == ledger.epsilon()
    record.accountant.step(noise_multiplier=2.0, sample_rate=0.2)  # a sixth step, never charged
    with pytest.raises(RuntimeError, match="did not charge"):
        check_accounting(record, ledger, 1e-5)


def test_a_label_model_without_labels_trains_nothing_and_charges_nothing(tmp_path: object) -> None:
    """A schema without labels gives a label model of zero-size regressions: no DP-SGD step
    runs, no update is released and the ledger stays empty (no budget spent on nothing)."""
    from pathlib import Path

    n = 300
    data = FeatureTensors(
        layout_of(synthetic_schema("finance")),
        {"scalar": torch.zeros(n, 1), LABEL_INPUT: torch.randn(n, 4), HALF: torch.randint(0, 2, (n,)),
         "labels": torch.zeros(n, 0)},
    )  # fmt: skip
    privacy = PrivacySettings(target_epsilon=3.0)
    ledger = PrivacyLedger(Path(str(tmp_path)), settings=privacy)
    result = train_locally(
        model=LabelModel(4, 0, ModelSettings()), data=data, settings=TrainingSettings(device="cpu"), privacy=privacy,
        noise_multiplier=2.0, ledger=ledger, round=1, randomness=SecretRandomness.for_mechanism(None, "p", 1),
        public_rows=n,
    )  # fmt: skip
    assert result.steps == 0 and result.epsilon is None
    assert ledger.entries == []
