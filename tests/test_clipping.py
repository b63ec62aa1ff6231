"""Per-sample clipping (fedpersona.privacy.clipping) against two independent oracles: Opacus'
per-sample gradients and clipping (GradSampleModule + DPOptimizer, noise 0, loss_reduction
"sum"), and a one-row-at-a-time autograd loop that clips each row's gradient explicitly.

Tolerances (float64 models): against the loop 1e-10 relative (the same sums in another
order). Against Opacus the bound that follows from its clip factor C / (norm + 1e-6) (the
engine's is C / norm): a clipped row's contribution differs by C / norm - C / (norm + 1e-6)
times its gradient of norm ``norm``, at most C 1e-6 / norm, so the whole clipped sum (all
parameters as one vector) differs by at most the sum of that over the clipped rows.
"""

from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from scipy import stats
from torch import nn
from torch.nn import functional as F

from fedpersona.privacy.clipping import clipped_gradient_sum, noisy_clipped_sum
from fedpersona.privacy.randomness import SecretRandomness

D, ROWS = 12, 40


def logistic_regression() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 1))


def tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, 1))


MODELS = {"logistic regression": logistic_regression, "tanh MLP": tanh_mlp}


def data(rows: int = ROWS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Rows of very different scales, so that some gradients are far above the clip, some below.
    scale = torch.exp(torch.linspace(-2.0, 2.0, rows, dtype=torch.float64))[:, None]
    x = torch.randn(rows, D, generator=generator, dtype=torch.float64) * scale
    y = (torch.rand(rows, generator=generator, dtype=torch.float64) < 0.5).to(torch.float64)
    return x, y


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().to(torch.float64)


def losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(x).squeeze(1), y, reduction="none")  # (B,)


def loop_oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> tuple[dict, torch.Tensor]:
    """One row at a time: its own backward, its own norm over all trainable parameters, its clip."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for b in range(len(x)):
        grads = torch.autograd.grad(losses(model, x[b : b + 1], y[b : b + 1]).sum(), list(params.values()))
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        for name, g in zip(params, grads, strict=True):
            total[name] += factor * g
    return total, torch.tensor(norms, dtype=torch.float64)


def opacus_oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> dict:
    wrapped = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.SGD(wrapped.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(x),
        loss_reduction="sum",
    )
    optimizer.zero_grad()
    F.binary_cross_entropy_with_logits(wrapped(x).squeeze(1), y, reduction="sum").backward()
    optimizer.pre_step()  # clip, sum, add (zero) noise: p.grad is the clipped sum
    out = {name.removeprefix("_module."): p.grad.detach().clone() for name, p in wrapped.named_parameters()}
    wrapped._close()
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_clipped_sum_equals_the_loop_and_opacus_with_rows_above_and_below_the_clip(name: str) -> None:
    x, y = data()
    model = build(name)
    _, norms = loop_oracle(model, x, y, clip=1.0)
    clip = float(norms.median())  # half the rows are clipped
    expected, norms = loop_oracle(model, x, y, clip)
    assert (norms > clip * 1.5).sum() >= 5 and (norms < clip / 1.5).sum() >= 5
    got = clipped_gradient_sum(model=model, per_sample_loss=lambda: losses(model, x, y), max_grad_norm=clip)
    assert got.batch_size == ROWS
    torch.testing.assert_close(got.norms, norms, rtol=1e-10, atol=1e-12)
    assert set(got.grads) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got.grads[key], value, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # no .grad touched

    reference = opacus_oracle(build(name), x, y, clip)
    assert set(reference) == set(expected)
    difference = math.sqrt(sum(float(((got.grads[k] - v) ** 2).sum()) for k, v in reference.items()))
    bound = float((clip * 1e-6 / norms[norms > clip]).sum())
    assert difference <= bound * 1.001 + 1e-12, (difference, bound)


def test_only_trainable_parameters_count_towards_the_norm() -> None:
    x, y = data()
    model = build("tanh MLP")
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    expected, norms = loop_oracle(model, x, y, clip=0.5)
    got = clipped_gradient_sum(model=model, per_sample_loss=lambda: losses(model, x, y), max_grad_norm=0.5)
    assert set(got.grads) == {"0.weight", "2.bias"} == set(expected)
    torch.testing.assert_close(got.norms, norms, rtol=1e-10, atol=1e-12)
    for key, value in expected.items():
        torch.testing.assert_close(got.grads[key], value, rtol=1e-10, atol=1e-12)


def test_float32_model_on_its_own_device_and_dtype() -> None:
    x, y = data()
    torch.manual_seed(0)
    model = tanh_mlp()
    x32, y32 = x.float(), y.float()
    got = clipped_gradient_sum(model=model, per_sample_loss=lambda: losses(model, x32, y32), max_grad_norm=1.0)
    expected, _ = loop_oracle(model.double(), x, y, clip=1.0)
    for key, value in expected.items():
        assert got.grads[key].dtype == torch.float32
        torch.testing.assert_close(got.grads[key].double(), value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "model,message",
    [
        (nn.Sequential(nn.Linear(D, 4), nn.LayerNorm(4), nn.Linear(4, 1)), "'1' (LayerNorm) holds parameters"),
        (nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 1)), "holds buffers"),
        (nn.Sequential(nn.Embedding(5, D)), "'0' (Embedding) holds parameters"),
        (nn.Sequential(nn.Tanh()), "at least one trainable torch.nn.Linear"),
    ],
)
def test_unsupported_layers_are_refused_naming_them(model: nn.Module, message: str) -> None:
    x, y = data()
    with pytest.raises(TypeError, match="per-sample clipping") as caught:
        clipped_gradient_sum(model=model.double(), per_sample_loss=lambda: losses(model, x, y), max_grad_norm=1.0)
    assert message in str(caught.value)


def test_shared_weights_and_non_2d_inputs_and_bad_losses_are_refused() -> None:
    x, y = data()
    shared = nn.Linear(D, D).double()
    twice = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(D, 1).double())
    with pytest.raises(ValueError, match="layer '0' was called twice"):
        clipped_gradient_sum(model=twice, per_sample_loss=lambda: losses(twice, x, y), max_grad_norm=1.0)

    tied = nn.Sequential(nn.Linear(D, D), nn.Linear(D, D)).double()
    tied[1].weight = tied[0].weight
    with pytest.raises(TypeError, match="'1' shares a parameter with '0'"):
        clipped_gradient_sum(model=tied, per_sample_loss=lambda: tied(x).sum(1), max_grad_norm=1.0)

    model = build("logistic regression")
    sequence = x.reshape(ROWS // 4, 4, D)  # (B, T, d): a sequence model, not supported
    with pytest.raises(ValueError, match=r"layer '0' got an input of shape \(10, 4, 12\); .* 2-D inputs"):
        clipped_gradient_sum(model=model, per_sample_loss=lambda: model(sequence).sum((1, 2)), max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"one loss per row, shape \(B,\), got \(\)"):
        clipped_gradient_sum(model=model, per_sample_loss=lambda: losses(model, x, y).sum(), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0, got 0"):
        clipped_gradient_sum(model=model, per_sample_loss=lambda: losses(model, x, y), max_grad_norm=0)
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number > 0"):
        noisy_clipped_sum(
            model=model, per_sample_loss=lambda: losses(model, x, y), max_grad_norm=1.0,
            noise_multiplier=math.nan, randomness=SecretRandomness(),
        )  # fmt: skip


def test_an_empty_batch_gives_a_zero_sum_and_still_releases_noise() -> None:
    x, y = data()
    model = build("tanh MLP")
    empty = clipped_gradient_sum(model=model, per_sample_loss=lambda: losses(model, x[:0], y[:0]), max_grad_norm=1.0)
    assert empty.batch_size == 0 and empty.norms.shape == (0,)
    assert all(
        torch.equal(g, torch.zeros_like(p)) for g, p in zip(empty.grads.values(), model.parameters(), strict=True)
    )

    key = bytes(range(32))
    noise = noisy_clipped_sum(
        model=model, per_sample_loss=lambda: losses(model, x[:0], y[:0]), max_grad_norm=1.0, noise_multiplier=2.0,
        randomness=SecretRandomness(key),
    )  # fmt: skip
    assert {k: v.shape for k, v in noise.items()} == {n: p.shape for n, p in model.named_parameters()}
    assert all(bool((v != 0).all()) for v in noise.values())
    # A non-empty batch under the same key releases its clipped sum plus exactly that noise.
    full = noisy_clipped_sum(
        model=model, per_sample_loss=lambda: losses(model, x, y), max_grad_norm=1.0, noise_multiplier=2.0,
        randomness=SecretRandomness(key),
    )  # fmt: skip
    clipped = clipped_gradient_sum(model=model, per_sample_loss=lambda: losses(model, x, y), max_grad_norm=1.0)
    for name in full:
        torch.testing.assert_close(full[name] - clipped.grads[name], noise[name], rtol=0, atol=1e-12)


def test_noise_on_a_zero_gradient_has_the_closed_form_distribution() -> None:
    """Coordinates of the release on an empty batch are i.i.d. N(0, (sigma C)^2). With z = noise
    / (sigma C) over n = 100,250 coordinates, sum(z^2) ~ chi2(n) and sum(z) / sqrt(n) ~ N(0, 1);
    the bounds below fail a correct implementation with probability 3e-10 in all (fresh secret
    key each run), and catch a std off by more than ~3%."""
    sigma, clip = 1.3, 0.7
    model = nn.Sequential(nn.Linear(400, 250))
    x = torch.zeros(0, 400)
    release = noisy_clipped_sum(
        model=model, per_sample_loss=lambda: model(x).sum(1), max_grad_norm=clip, noise_multiplier=sigma,
        randomness=SecretRandomness(),
    )  # fmt: skip
    z = torch.cat([v.flatten() for v in release.values()]).double() / (sigma * clip)
    n = z.numel()
    assert n == 100_250
    squares = float((z * z).sum())
    assert stats.chi2.ppf(1e-10, n) < squares < stats.chi2.isf(1e-10, n), squares / n
    assert abs(float(z.sum())) / math.sqrt(n) < stats.norm.isf(0.5e-10)


def test_same_key_same_noise_different_key_different_noise() -> None:
    x, y = data()
    model = build("logistic regression")

    def release(key: bytes) -> torch.Tensor:
        out = noisy_clipped_sum(
            model=model, per_sample_loss=lambda: losses(model, x, y), max_grad_norm=1.0, noise_multiplier=1.0,
            randomness=SecretRandomness(key),
        )  # fmt: skip
        return torch.cat([v.flatten() for v in out.values()])

    first, again, other = release(b"a" * 32), release(b"a" * 32), release(b"b" * 32)
    assert torch.equal(first, again)
    assert not torch.isclose(first, other).any()


class TwoHeads(nn.Module):
    """The label model's shape: one input, two linear heads (no Sequential), losses summed per row."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(D, 1)
        self.second = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(x).squeeze(1), self.second(x)


def two_head_losses(model: TwoHeads, x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    logit, scores = model(x)
    return F.binary_cross_entropy_with_logits(logit, y, reduction="none") + F.cross_entropy(
        scores, classes, reduction="none"
    )  # (B,)


def test_two_linear_heads_on_one_input_equal_the_loop_and_opacus() -> None:
    x, y = data()
    classes = torch.arange(ROWS) % 3
    torch.manual_seed(1)
    model = TwoHeads().double()

    params = dict(model.named_parameters())
    rows = []
    for b in range(ROWS):  # one row at a time: its own backward and norm
        row_loss = two_head_losses(model, x[b : b + 1], y[b : b + 1], classes[b : b + 1]).sum()
        rows.append(torch.autograd.grad(row_loss, list(params.values())))
    norm_tensor = torch.tensor(
        [math.sqrt(sum(float((g * g).sum()) for g in grads)) for grads in rows], dtype=torch.float64
    )
    clip = float(norm_tensor.median())  # half the rows are clipped
    assert (norm_tensor > clip * 1.5).sum() >= 5 and (norm_tensor < clip / 1.5).sum() >= 5
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for grads, norm in zip(rows, norm_tensor.tolist(), strict=True):
        for n, g in zip(params, grads, strict=True):
            expected[n] += min(1.0, clip / norm) * g
    got = clipped_gradient_sum(
        model=model, per_sample_loss=lambda: two_head_losses(model, x, y, classes), max_grad_norm=clip
    )
    torch.testing.assert_close(got.norms, norm_tensor, rtol=1e-10, atol=1e-12)
    for key, value in expected.items():
        torch.testing.assert_close(got.grads[key], value, rtol=1e-10, atol=1e-12)

    wrapped = GradSampleModule(TwoHeads().double(), loss_reduction="sum")
    wrapped.load_state_dict({f"_module.{k}": v for k, v in model.state_dict().items()})
    optimizer = DPOptimizer(
        torch.optim.SGD(wrapped.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=ROWS, loss_reduction="sum",
    )  # fmt: skip
    optimizer.zero_grad()
    two_head_losses(wrapped, x, y, classes).sum().backward()  # type: ignore[arg-type]
    optimizer.pre_step()
    reference = {name.removeprefix("_module."): p.grad.detach().clone() for name, p in wrapped.named_parameters()}
    wrapped._close()
    for key, value in reference.items():
        torch.testing.assert_close(got.grads[key], value, rtol=0, atol=1e-6)


def test_rows_with_a_missing_label_masked_out_of_the_loss_contribute_nothing() -> None:
    """NaN labels are replaced before the loss (a NaN inside an unselected torch.where branch
    would still poison the backward) and masked out of it: those rows' gradients are zero, so
    the clipped sum equals the sum over the labelled rows alone."""
    x, y = data()
    y = y.clone()
    missing = torch.arange(ROWS) % 3 == 0
    y[missing] = math.nan
    model = build("tanh MLP")

    def masked(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(yb)
        per_row = F.binary_cross_entropy_with_logits(model(xb).squeeze(1), torch.nan_to_num(yb), reduction="none")
        return per_row * known

    got = clipped_gradient_sum(model=model, per_sample_loss=lambda: masked(x, y), max_grad_norm=0.5)
    assert torch.equal(got.norms[missing], torch.zeros(int(missing.sum()), dtype=torch.float64))
    assert bool((got.norms[~missing] > 0).all())
    labelled = clipped_gradient_sum(
        model=model, per_sample_loss=lambda: losses(model, x[~missing], y[~missing]), max_grad_norm=0.5
    )
    for key, value in labelled.grads.items():
        assert bool(torch.isfinite(got.grads[key]).all())
        torch.testing.assert_close(got.grads[key], value, rtol=1e-10, atol=1e-12)
