"""The persona encoder: Opacus compatibility, exact per-sample gradients, scopes."""

from __future__ import annotations

import math
import re

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedpersona.config.settings import ModelSettings
from fedpersona.errors import ConfigError
from fedpersona.federation.partner import PartnerData, build_model
from fedpersona.model.encoder import PersonaEncoder, ScalarStats, _at_least_one, random_keep, token_presence
from fedpersona.model.scopes import SCOPES, parameter_scope


def test_model_passes_opacus_validator(small_data: PartnerData, model_cfg: ModelSettings) -> None:
    model = build_model(small_data, model_cfg, seed=0, device=torch.device("cpu"))
    ModuleValidator.validate(model, strict=True)  # raises on any unsupported layer


def test_every_parameter_has_a_declared_scope(small_data: PartnerData, model_cfg: ModelSettings) -> None:
    model = build_model(small_data, model_cfg, seed=0, device=torch.device("cpu"))
    scopes = {parameter_scope(name) for name in model.state_dict()}
    assert scopes == {"global", "kind", "local"}
    assert SCOPES["trunk"] == "global" and SCOPES["adapter"] == "kind"
    with pytest.raises(KeyError, match="no declared scope"):
        parameter_scope("mystery.weight")


def test_per_sample_gradients_equal_one_sample_at_a_time(small_data: PartnerData, model_cfg: ModelSettings) -> None:
    torch.manual_seed(0)
    model = build_model(small_data, model_cfg, seed=0, device=torch.device("cpu")).double()
    index = torch.arange(6)
    batch = small_data.train.batch(index)
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    keep = random_keep(token_presence(small_data.train.layout, batch), 0.3, torch.Generator().manual_seed(1))
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm(batch, keep).sum().backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.grad_sample is not None}
    gsm._close()
    reference = build_model(small_data, model_cfg, seed=0, device=torch.device("cpu")).double()
    reference.load_state_dict(model.state_dict())
    for i in range(len(index)):
        reference.zero_grad()
        one = {k: v[i : i + 1] for k, v in batch.items()}
        reference(one, keep[i : i + 1]).sum().backward()
        for name, param in reference.named_parameters():
            expected = param.grad if param.grad is not None else torch.zeros_like(param)
            torch.testing.assert_close(per_sample[name][i], expected, rtol=1e-6, atol=1e-9)
    assert len(per_sample) == len(list(model.parameters()))


def test_embedding_is_unit_norm_and_handles_missing_tokens(small_data: PartnerData, model_cfg: ModelSettings) -> None:
    model = build_model(small_data, model_cfg, seed=0, device=torch.device("cpu"))
    batch = small_data.test.batch(torch.arange(10))
    for key in list(batch):
        if key.endswith("present"):
            batch[key] = torch.zeros_like(batch[key])  # every value missing
    z = model.embed(batch)
    assert z.shape == (10, model_cfg.embed_dim)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(10))


def test_config_validates_its_range() -> None:
    with pytest.raises(ConfigError, match=re.escape("model.mask_rate: must be < 1, got 1.5")):
        ModelSettings.checked(mask_rate=1.5)
    with pytest.raises(ConfigError, match=re.escape("model.label_weight: must be >= 0, got -1.0")):
        ModelSettings.checked(label_weight=-1.0)


def test_scalar_stats_learn_each_feature_mean_and_variance() -> None:
    """Fitted by gradient steps alone, the local statistics match numpy's mean and variance
    of the present values (the missing ones are ignored), feature by feature."""
    gen = torch.Generator().manual_seed(0)
    n = 4000
    spread = torch.tensor([0.02, 0.1, 0.3])
    values = (torch.tensor([0.2, 0.5, 0.6]) + spread * torch.randn(n, 3, generator=gen)).clamp(0, 1)
    present = torch.rand(n, 3, generator=gen) > 0.2
    stats = ScalarStats(3)
    opt = torch.optim.Adam(stats.parameters(), lr=0.05)
    for _ in range(400):
        nll, _ = stats(values, present)
        opt.zero_grad()
        nll.mean().backward()
        opt.step()
    _, inverse_var = stats(values[:1], present[:1])
    for f in range(3):
        seen = values[present[:, f], f].double().numpy()
        assert stats.mean.weight[0, f].item() == pytest.approx(seen.mean(), abs=0.01)
        assert 1.0 / inverse_var[0, f].item() == pytest.approx(seen.var(), rel=0.15)
    assert not inverse_var.requires_grad  # the weights scale the loss; the loss does not train them


def test_reconstruction_error_is_standardised_by_the_learned_variance(
    small_data: PartnerData, model_cfg: ModelSettings
) -> None:
    """Halving a feature's learned variance doubles its share of the reconstruction loss."""
    model = build_model(small_data, model_cfg, seed=0, device=torch.device("cpu"))
    batch = small_data.test.batch(torch.arange(20))
    present = token_presence(small_data.test.layout, batch)
    keep = torch.zeros_like(present)
    keep[:, -1] = True  # hide the scalars (the last token stays visible where present)
    keep = _at_least_one(keep & present)
    target = present & ~keep
    z = model.embed(batch)
    total, count, _ = model._reconstruction(z, batch, target)
    assert model.scalar_stats is not None
    with torch.no_grad():
        model.scalar_stats.log_var.weight[0, 0] -= math.log(2.0)
    total2, count2, _ = model._reconstruction(z, batch, target)
    torch.testing.assert_close(count2, count)
    out = model.recon_head(z)
    first = (torch.sigmoid(out[:, 0]) - batch["scalar"][:, 0]) ** 2 * target[:, 0] * 12.0
    assert first.sum() > 0
    torch.testing.assert_close(total2 - total, first, rtol=1e-3, atol=1e-5)


def test_adapter_feeds_numbers_centred_and_scaled_by_their_typical_range() -> None:
    """A scalar's token is ((x - centre) / spread) * scale + shift, held within 6 spreads; a
    numeric sequence's steps are standardised the same way before its linear layer."""
    import numpy as np
    import pandas as pd

    from fedpersona.data.features import featurize
    from fedpersona.data.schema_reader import parse_schema
    from fedpersona.data.tables import validate_frame

    schema = parse_schema(
        {
            "table": {"kind": "finance", "min_rows": 1},
            "features": {
                "AGE": {"type": "numeric", "bounds": [0, 100], "typical": [30, 50]},
                "KIDS": {"type": "numeric", "bounds": [0, 10]},
                "BILL": {"type": "sequence", "columns": ["B1", "B2"], "bounds": [0, 1000], "typical": [100, 300]},
            },
        },
        source="t",
    )
    frame = pd.DataFrame(
        {"AGE": ["40", "50", "100"], "KIDS": ["2", "0", "5"], "B1": ["200", "0", "300"], "B2": ["100", "1000", "200"]}
    )
    data = featurize(validate_frame(schema, frame, source="t.csv"))
    torch.manual_seed(0)
    model = PersonaEncoder(data.layout, ModelSettings(token_dim=4, embed_dim=4, hidden=4, blocks=0))
    adapter = model.adapter
    batch = data.batch(torch.arange(3))
    tokens, _ = adapter(batch)
    age = torch.tensor([0.0, 1.6448536, 6.0])  # 40 = centre; 50 = top of the range; 100 (9.9) held at 6
    kids = torch.tensor([0.2, 0.0, 0.5])  # no typical range: the [0, 1]-scaled value itself
    assert adapter.scalar_scale is not None and adapter.scalar_shift is not None
    scale, shift = adapter.scalar_scale.weight.detach(), adapter.scalar_shift.weight.detach()
    torch.testing.assert_close(tokens[:, 0], age[:, None] * scale[0] + shift[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tokens[:, 1], kids[:, None] * scale[1] + shift[1])
    bill_spread = 0.2 / (2 * 1.6448536269514722)
    steps = (torch.tensor([[0.2, 0.1], [0.0, 1.0], [0.3, 0.2]]) - 0.2) / bill_spread
    lin = adapter.seq_num[0]
    expected = lin(torch.cat([steps.clamp(-6, 6), torch.ones(3, 2)], 1)).detach()
    torch.testing.assert_close(tokens[:, 2].detach(), expected, rtol=1e-4, atol=1e-4)
    assert np.isfinite(tokens.detach().numpy()).all()


def test_label_weight_scales_the_label_gradient_into_the_encoder_not_into_the_head(
    small_data: PartnerData, model_cfg: ModelSettings
) -> None:
    """The label term's gradient (loss with labels minus loss without) reaches the encoder
    times label_weight (none at 0, half at 0.5) while the head's gradient stays the same."""

    batch = small_data.train.batch(torch.arange(40))
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], float("nan"))}
    keep = random_keep(token_presence(small_data.train.layout, batch), 0.3, torch.Generator().manual_seed(1))

    def label_gradients(weight: float) -> dict[str, torch.Tensor]:
        model = build_model(small_data, model_cfg.replace(label_weight=weight), seed=0, device=torch.device("cpu"))
        model = model.double()
        grads = []
        for data in (batch, unlabelled):
            model.zero_grad()
            data = {k: (v.double() if v.is_floating_point() else v) for k, v in data.items()}
            model(data, keep).sum().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        with_labels, without = grads
        return {n: g - without.get(n, torch.zeros_like(g)) for n, g in with_labels.items()}

    full, half, none = label_gradients(1.0), label_gradients(0.5), label_gradients(0.0)
    encoder = [n for n in full if n.startswith(("adapter.", "trunk."))]
    assert encoder and max(full[n].abs().max().item() for n in encoder) > 1e-6
    for name in encoder:
        torch.testing.assert_close(half[name], 0.5 * full[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(none[name], torch.zeros_like(full[name]), rtol=0, atol=1e-12)
    for name in ("label_head.weight", "label_head.bias"):
        assert full[name].abs().max().item() > 1e-6
        torch.testing.assert_close(none[name], full[name], rtol=1e-9, atol=1e-12)
