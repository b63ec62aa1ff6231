"""Per-sample clipping (fedpersona.privacy.clipping) against two independent oracles: Opacus'
per-sample gradients and clipping (GradSampleModule + DPOptimizer, noise 0, loss_reduction
"sum"), and a one-row-at-a-time autograd loop that clips each row's gradient explicitly; the
loop also on token models (embeddings with repeated and padding indices, layer norms, linear
layers on (B, T, d)) and on the default persona encoder of every silo kind.

Tolerances (float64 models): against the loop 1e-10 relative (the same sums in another
order). Against Opacus the bound that follows from its clip factor C / (norm + 1e-6) (the
engine's is C / norm): a clipped row's contribution differs by C / norm - C / (norm + 1e-6)
times its gradient of norm ``norm``, at most C 1e-6 / norm, so the whole clipped sum (all
parameters as one vector) differs by at most the sum of that over the clipped rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from scipy import stats
from torch import nn
from torch.nn import functional as F

from fedpersona.config.settings import ModelSettings
from fedpersona.data.features import featurize
from fedpersona.data.synthetic import generate_silo
from fedpersona.model.encoder import PersonaEncoder, random_keep, token_presence
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
        (nn.Sequential(nn.Linear(D, 4), nn.PReLU(), nn.Linear(4, 1)), "'1' (PReLU) holds parameters"),
        (nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 1)), "mixes the rows"),
        (nn.Sequential(nn.Embedding(5, D, max_norm=1.0)), "'0' (Embedding) uses max_norm"),
        (nn.Sequential(nn.Tanh()), "at least one trainable Linear, Embedding or LayerNorm"),
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
    with pytest.raises(ValueError, match=r"layer '0' got an input of shape \(12,\); .* \(B, ..., features\)"):
        clipped_gradient_sum(model=model, per_sample_loss=lambda: model(x[0]), max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"layer '0' saw an input of shape \(40, 12\) but per_sample_loss returned 2"):
        clipped_gradient_sum(model=model, per_sample_loss=lambda: losses(model, x, y)[:2], max_grad_norm=1.0)
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


# --- token models and the persona encoder -------------------------------------------------------


def loop_clipped_sum(
    model: nn.Module, row_loss: Callable[[int], torch.Tensor], rows: int, clip: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The oracle for any model: ``row_loss(b)`` runs the model on row ``b`` alone; its own
    backward, its own norm over all trainable parameters, its own clip factor."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for b in range(rows):
        grads = torch.autograd.grad(row_loss(b), list(params.values()), allow_unused=True)
        filled = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values(), strict=True)]
        norm = math.sqrt(sum(float((g * g).sum()) for g in filled))
        norms.append(norm)
        for name, g in zip(params, filled, strict=True):
            total[name] += (min(1.0, clip / norm) if norm > 0 else 1.0) * g
    return total, torch.tensor(norms, dtype=torch.float64)


class TokenModel(nn.Module):
    """Each row: L token ids (0 = padding, repeats allowed) through an embedding with
    padding_idx, a layer norm, two linear layers on every token (T = L: one wide enough for
    the T x T Gram norms, T (p + k) <= p k; one narrow, with a per-row gradient), a linear layer
    on the flattened tokens and a per-row scalar embedding (index 0)."""

    def __init__(self, vocab: int, length: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.token = nn.Linear(d, 12)  # L (d + 12) <= 12 d for d = 16, L = 6: Gram norms
        self.narrow = nn.Linear(12, 2)  # L (12 + 2) > 24: per-row gradient norms
        self.flat = nn.Linear(length * 2, 1)
        self.offset = nn.Embedding(1, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B,)
        h = self.narrow(torch.tanh(self.token(self.norm(self.emb(ids)))))  # (B, L, 2)
        zero = torch.zeros(ids.shape[0], dtype=torch.long)
        return self.flat(torch.tanh(h).flatten(1)).squeeze(1) + self.offset(zero).squeeze(1)


def test_embeddings_layer_norms_and_token_linears_equal_the_loop() -> None:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 4, (ROWS, 6), generator=generator)  # a vocabulary of 4: many repeats and paddings
    ids[0] = 0  # one row of padding only
    torch.manual_seed(2)
    model = TokenModel(vocab=4, length=6, d=16).double()
    target = torch.randn(ROWS, generator=generator, dtype=torch.float64)

    def row_losses(rows: slice) -> torch.Tensor:
        return (model(ids[rows]) - target[rows]) ** 2 * torch.linspace(0.1, 10.0, ROWS, dtype=torch.float64)[rows]

    _, norms = loop_clipped_sum(model, lambda b: row_losses(slice(b, b + 1)).sum(), ROWS, clip=1.0)
    clip = float(norms.median())
    expected, norms = loop_clipped_sum(model, lambda b: row_losses(slice(b, b + 1)).sum(), ROWS, clip)
    assert (norms > clip * 1.5).sum() >= 5 and (norms < clip / 1.5).sum() >= 5
    got = clipped_gradient_sum(model=model, per_sample_loss=lambda: row_losses(slice(None)), max_grad_norm=clip)
    torch.testing.assert_close(got.norms, norms, rtol=1e-10, atol=1e-12)
    assert set(got.grads) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got.grads[key], value, rtol=1e-10, atol=1e-12)
    assert torch.equal(got.grads["emb.weight"][0], torch.zeros(16, dtype=torch.float64))  # padding row


@pytest.mark.parametrize("kind", ["ecommerce", "finance", "health"])
def test_default_persona_encoder_equals_the_loop(kind: str) -> None:
    """Every layer of the default encoder (feature embeddings, text and sequence embeddings,
    numeric-sequence linears, the trunk's layer norms and token MLPs, pooling, heads, the
    scalar statistics' embeddings): the clipped sum equals one-row-at-a-time clipping within
    1e-9 relative in float64, and every trainable parameter is in it."""
    data = featurize(generate_silo(kind, ROWS, seed=0).table)
    torch.manual_seed(0)
    model = PersonaEncoder(data.layout, ModelSettings()).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in data.tensors.items()}
    keep = random_keep(token_presence(data.layout, batch), 0.3, torch.Generator().manual_seed(1))
    kinds = {type(m) for m in model.modules() if next(m.parameters(recurse=False), None) is not None}
    assert kinds == {nn.Embedding, nn.LayerNorm, nn.Linear}

    def row_loss(b: int) -> torch.Tensor:
        return model({k: v[b : b + 1] for k, v in batch.items()}, keep[b : b + 1]).sum()

    _, norms = loop_clipped_sum(model, row_loss, ROWS, clip=1.0)
    clip = float(norms.median())
    expected, norms = loop_clipped_sum(model, row_loss, ROWS, clip)
    assert (norms > clip * 1.01).sum() >= 10 and (norms < clip / 1.01).sum() >= 10  # half of the rows clipped
    got = clipped_gradient_sum(model=model, per_sample_loss=lambda: model(batch, keep), max_grad_norm=clip)
    torch.testing.assert_close(got.norms, norms, rtol=1e-9, atol=1e-12)
    assert set(got.grads) == {n for n, _ in model.named_parameters()} == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got.grads[key], value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.losses, model(batch, keep).detach(), rtol=0, atol=0)
