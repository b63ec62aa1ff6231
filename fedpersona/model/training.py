"""Local training at a partner: DP-SGD, one row = one user.

Batches are drawn by Poisson sampling (each row independently with probability q) as
tensor operations on the device, with exactly the q that Opacus' accountant records for
each step, so the privacy analysis (which assumes Poisson sampling) matches what runs.
The privacy engine's accountant is seeded with the partner's whole ledger history before
training, so every epsilon it reports is cumulative over all rounds and restarts.

**Per-sample clipping** (``training.grad_sample_mode``), exact in every mode:

- ``"bookkeeping"`` (the default): :func:`fedpersona.privacy.clipping.clipped_gradient_sum`
  (one forward, one backward; the math is in that module), or for the label model the same
  sums in closed form (:meth:`fedpersona.model.linear.LabelModel.clipped_sum`: no autograd). Each step releases
  ``(sum_b c_b grad_b + N(0, (sigma C)^2 I)) / E[B]`` with ``c_b = min(1, C / ||grad_b||)``,
  the noise from :func:`fedpersona.privacy.clipping.add_secret_noise` and ``E[B] = int(q *
  public_rows)`` as Opacus divides, and each step is recorded as ``(sigma, q, 1)`` in a step
  record (:class:`StepRecord`, what Opacus' optimizer hook records in its accountant in the
  other modes), so :func:`check_accounting` compares the same histories. This path does not
  import Opacus (about a second of CPU in every process that trains, and in deployment every
  message is a fresh process).
- ``"ghost"`` and ``"hooks"``: Opacus' ``make_private`` with its fast gradient clipping (two
  backward passes) or per-sample gradients, the noise replaced by :func:`_secret_noise`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedpersona.config.settings import PrivacySettings, TrainingSettings, sample_rate_for
from fedpersona.data.features import FeatureTensors
from fedpersona.errors import ConfigError
from fedpersona.model.encoder import PersonaEncoder, random_keep, token_presence
from fedpersona.model.linear import LabelModel
from fedpersona.privacy.accounting import merge_history
from fedpersona.privacy.clipping import ClippedSum, add_secret_noise, clipped_gradient_sum
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.randomness import SecretRandomness

if TYPE_CHECKING:
    from opacus import PrivacyEngine

__all__ = ["LocalResult", "StepRecord", "TrainedModel", "check_accounting", "pick_device", "train_locally"]

TrainedModel = PersonaEncoder | LabelModel
"""What DP-SGD trains: the label model (the default) or the persona encoder."""

logger = logging.getLogger(__name__)


class _Accountant(Protocol):
    history: list[tuple[float, float, int]]


class _WithAccountant(Protocol):
    @property
    def accountant(self) -> _Accountant: ...


class StepRecord:
    """The noisy steps a book-keeping round ran, as Opacus' accountants record them (a history of
    ``(sigma, q, steps)``): ``record.accountant.step(noise_multiplier=..., sample_rate=...)``
    appends one step. :func:`check_accounting` reads it as it reads a privacy engine."""

    def __init__(self, history: list[tuple[float, float, int]]) -> None:
        self.history = list(history)

    @property
    def accountant(self) -> StepRecord:
        return self

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        self.history.append((float(noise_multiplier), float(sample_rate), 1))


@dataclass(frozen=True)
class LocalResult:
    """What one local round did; every number here is public (a function of the plan)."""

    steps: int
    sample_rate: float
    noise_multiplier: float | None
    epsilon: float | None
    mean_loss: float


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device = 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


class _PerSampleLoss:
    """Criterion for Opacus' ghost clipping: the model already returns per-sample losses."""

    reduction = "mean"

    def __call__(self, per_sample: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


def train_locally(
    *,
    model: TrainedModel,
    data: FeatureTensors,
    settings: TrainingSettings,
    privacy: PrivacySettings,
    noise_multiplier: float | None,
    ledger: PrivacyLedger | None,
    round: int,
    randomness: SecretRandomness,
    public_rows: int | None = None,
    anchor: dict[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Run one round of local training in place on ``model``.

    The optimizer (``training.optimizer``) is plain SGD or Adam, made fresh each round (no
    optimizer state crosses rounds: the global model the server sends is the only state).

    For a private run the ledger is charged (and the budget checked) before the first
    gradient step; :class:`~fedpersona.errors.PrivacyBudgetExceeded` leaves the model and the
    ledger untouched. ``anchor`` holds the global parameters received this round, used by the
    FedProx proximal step (applied after each noisy step: post-processing, no privacy cost).

    ``public_rows`` is the partner's public (DP-noised) row count: the sample rate, the steps
    and the expected batch size the noisy sum is divided by are functions of it, never of the
    exact row count, so nothing a release depends on besides the rows' content reveals how many
    users the table holds (the add/remove neighbouring relation). Poisson sampling runs over
    the actual rows at that rate. All randomness comes from ``randomness`` (the batches, the
    noise, the feature masks): see :mod:`fedpersona.privacy.randomness`.
    """
    rows = len(data)
    public = rows if public_rows is None else int(public_rows)
    batch_size = settings.batch_for(public)
    q = sample_rate_for(public, batch_size)
    steps = settings.steps_per_round(public)
    if not any(p.requires_grad and p.numel() > 0 for p in model.parameters()):
        # Nothing to train (a label model for a table without labels has zero-size
        # regressions): no step, no release, nothing charged.
        return LocalResult(0, q, noise_multiplier, None, 0.0)
    device = next(model.parameters()).device
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=settings.lr)
        if settings.optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=settings.lr)
    )
    criterion = _PerSampleLoss()
    engine: PrivacyEngine | StepRecord | None = None
    train_model: torch.nn.Module = model
    bookkeeping = privacy.private and settings.grad_sample_mode == "bookkeeping"
    expected_batch = 1
    model.train()
    if privacy.private:
        if noise_multiplier is None or ledger is None:
            raise ValueError("a private round needs a planned noise multiplier and a ledger")
        ledger.charge(
            round=round, mechanism="dp-sgd", noise_multiplier=noise_multiplier,
            sample_rate=q, steps=steps,
        )  # fmt: skip
        # Everything charged before this round's entry (read after the charge, which may have
        # caught up with entries another writer appended).
        earlier = merge_history(ledger.history[:-1])
        # Only its length matters: Opacus derives q = 1 / len(loader) and the expected batch
        # size from it, both functions of the public row count.
        index_loader = DataLoader(TensorDataset(torch.arange(public)), batch_size=max(1, min(batch_size, public)))
        if not math.isclose(1.0 / len(index_loader), q):
            raise RuntimeError("sample rate mismatch between the plan and Opacus")
        if bookkeeping:
            engine = StepRecord(earlier)
            expected_batch = max(1, int(public * q))  # Opacus' expected_batch_size for this loader
        else:
            opacus_engine = _privacy_engine(privacy.accountant)
            opacus_engine.accountant.history = earlier
            engine = opacus_engine
            private = opacus_engine.make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=index_loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=privacy.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=settings.grad_sample_mode,
            )
            if settings.grad_sample_mode == "ghost":
                train_model, optimizer, criterion, _ = private
            else:
                train_model, optimizer, _ = private
            _secret_noise(optimizer, randomness)
    model.train()
    masks = randomness.torch_generator(device)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    closed_form = getattr(model, "clipped_sum", None)  # the label model: the same sums without autograd
    if closed_form is not None and len(trainable) != len(list(model.parameters())):
        closed_form = None  # a frozen parameter: the generic path, which skips it
    keys = getattr(model, "batch_keys", None)  # the tensors the model reads (None: all)
    total = 0.0
    for _ in range(steps):
        index = torch.from_numpy(randomness.poisson_sample(rows, q)).to(data.tensors["scalar"].device)
        if bookkeeping:
            assert engine is not None and noise_multiplier is not None
            total += _bookkeeping_step(
                model=model, data=data, index=index, masks=masks, trainable=trainable, closed_form=closed_form,
                keys=keys, optimizer=optimizer, randomness=randomness, noise_multiplier=noise_multiplier,
                max_grad_norm=privacy.max_grad_norm, expected_batch=expected_batch,
            )  # fmt: skip
            engine.accountant.step(noise_multiplier=noise_multiplier, sample_rate=q)
            if anchor and settings.fedprox_mu > 0:
                _proximal_step(model, anchor, settings.lr * settings.fedprox_mu)
            continue
        if len(index) == 0 and (engine is None or settings.grad_sample_mode == "ghost"):
            # An empty Poisson batch (probability (1 - q)^rows). Non-private: nothing to learn.
            # Private: the step is still taken, as pure noise on a zero gradient, because that
            # is what the accounted mechanism releases (skipping it would reveal the empty
            # batch). Hooks mode handles a zero-length batch by itself; ghost clipping cannot.
            if engine is not None:
                for param in model.parameters():
                    if param.requires_grad:
                        param.grad = torch.zeros_like(param)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            continue
        batch = data.batch(index, keys)
        keep = _keep(model, data, batch, masks)
        per_sample = train_model(batch, keep)
        loss = criterion(per_sample) if engine is not None else per_sample.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if anchor and settings.fedprox_mu > 0:
            _proximal_step(model, anchor, settings.lr * settings.fedprox_mu)
        total += float(per_sample.detach().mean()) if len(index) else 0.0
    epsilon: float | None = None
    if engine is not None:
        assert ledger is not None
        epsilon = check_accounting(engine, ledger, privacy.delta)
        if not bookkeeping:
            train_model._close()  # type: ignore[operator]
    model.eval()
    return LocalResult(steps, q, noise_multiplier, epsilon, total / max(1, steps))


def _keep(
    model: torch.nn.Module, data: FeatureTensors, batch: dict[str, torch.Tensor], masks: torch.Generator
) -> torch.Tensor | None:
    """The encoder's random feature mask for a batch (None for a model that masks nothing)."""
    if not getattr(model, "takes_keep", True):
        return None
    rate = float(model.config.mask_rate)  # type: ignore[union-attr, arg-type]
    return random_keep(token_presence(data.layout, batch), rate, masks)


def _bookkeeping_step(
    *,
    model: torch.nn.Module,
    data: FeatureTensors,
    index: torch.Tensor,
    masks: torch.Generator,
    trainable: list[tuple[str, torch.nn.Parameter]],
    closed_form: Callable[[dict[str, torch.Tensor], float], ClippedSum] | None,
    keys: Sequence[str] | None,
    optimizer: torch.optim.Optimizer,
    randomness: SecretRandomness,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch: int,
) -> float:
    """One DP-SGD step with book-keeping clipping; returns the batch's mean loss (0 if empty).

    ``p.grad`` becomes ``(clipped sum + N(0, (sigma C)^2)) / expected_batch`` for every trainable
    parameter. An empty Poisson batch is still a step: noise on a zero sum (skipping it would
    reveal the empty batch). The clipped sum and the losses stay here; only the noisy step
    changes the model.
    """
    mean_loss = 0.0
    if len(index) == 0:
        summed = {name: torch.zeros_like(p) for name, p in trainable}
    else:
        batch = data.batch(index, keys)
        if closed_form is not None:
            clipped = closed_form(batch, max_grad_norm)
        else:
            keep = _keep(model, data, batch, masks)
            clipped = clipped_gradient_sum(
                model=model, per_sample_loss=lambda: model(batch, keep), max_grad_norm=max_grad_norm
            )
        summed = clipped.grads
        mean_loss = float(clipped.losses.mean())
    noisy = add_secret_noise(summed, std=noise_multiplier * max_grad_norm, randomness=randomness)
    torch._foreach_div_(list(noisy.values()), float(expected_batch))  # one call for every tensor
    for name, p in trainable:
        p.grad = noisy[name]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss


def check_accounting(engine: _WithAccountant, ledger: PrivacyLedger, delta: float) -> float:
    """The ledger's epsilon, refused unless the ledger charged every step Opacus took.

    Opacus' accountant records each noisy step it actually ran as ``(sigma, q, steps)``; the
    ledger holds what was paid for before the round. Their histories (grouped by ``(sigma, q)``,
    which changes no epsilon) must be equal, or a step ran that nobody paid for. Comparing the
    histories is exact and costs nothing; the epsilon is the one the ledger computed once, at
    the charge (``delta`` is the ledger's, checked against the accountant's histories only).
    """
    taken = merge_history([(float(s), float(q), int(n)) for s, q, n in engine.accountant.history])
    charged = merge_history(ledger.history)
    if taken != charged:
        raise RuntimeError(
            f"accountant history {taken} and ledger history {charged} disagree: "
            "steps were taken that the ledger did not charge"
        )
    return ledger.epsilon()


def _privacy_engine(accountant: str) -> PrivacyEngine:
    """A PrivacyEngine for its accountant and per-sample clipping.

    Opacus warns that its own RNG is not cryptographically secure (its ``secure_mode`` needs
    torchcsprng, which is not maintained for current torch). The warning does not apply:
    :func:`_secret_noise` replaces Opacus' noise with noise from the partner's secret ChaCha20
    stream, so the notice is dropped here and only here.
    """
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        return PrivacyEngine(accountant=accountant)


def _secret_noise(optimizer: torch.optim.Optimizer, randomness: SecretRandomness) -> None:
    """Make Opacus' DP optimizer draw its Gaussian noise from ``randomness``.

    Same mechanism as Opacus' ``add_noise`` (``N(0, (noise_multiplier * max_grad_norm)^2)``
    per coordinate, added to the summed clipped gradient), with the noise from the partner's
    secret stream instead of a torch generator the coordinator could predict.
    """

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm  # type: ignore[attr-defined]
        for p in optimizer.params:  # type: ignore[attr-defined]
            summed = p.summed_grad
            p.grad = (summed + randomness.normal_like(summed, std)).view_as(p)

    optimizer.add_noise = add_noise  # type: ignore[attr-defined]


@torch.no_grad()
def _proximal_step(model: TrainedModel, anchor: dict[str, torch.Tensor], strength: float) -> None:
    """Pull shared parameters toward the received global ones (FedProx)."""
    for name, param in model.named_parameters():
        ref = anchor.get(name)
        if ref is not None:
            param.sub_(strength * (param - ref.to(param.device)))
