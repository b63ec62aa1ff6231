"""DP-correct preprocessing: one user's row cannot move anything but its own tensors.

DP-SGD's guarantee covers the model update only if everything else a partner computes or
sends is either a function of that row alone (featurization) or public by declaration (the
schema, the configuration, the example counts). Here a neighbouring table differs from the
original in ONE row, filled with extreme values (1e30, unseen categories, a very long
text), or has one row more; we check that:

- featurization constants do not depend on other rows: every other row's tensors are
  bit-identical, the layout is the schema's, and a row featurized alone equals its row in
  the table;
- the extreme row is squashed into the schema's public bounds (1e30 looks exactly like the
  upper bound);
- the partner's ``query`` reply (all of it ``public`` in the release manifest) is unchanged
  by a changed row and by a row added: the row count it reports, and the noise plan derived
  from it, are the partner's declaration (``data.public_rows``), not the table's count;
- the train/test split is row-local: adding one user moves no other user between train and
  test;
- the extreme row cannot raise the sensitivity: its per-sample gradient is finite, Opacus
  clips it to ``max_grad_norm``, and the batch's summed clipped gradient moves by at most
  ``max_grad_norm`` when the row is removed.
"""

from __future__ import annotations

import time
import uuid
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedpersona.config.files import dump_toml, load_partner_config
from fedpersona.config.settings import ModelSettings, PrivacySettings, TrainingSettings
from fedpersona.data.dense import dense_views
from fedpersona.data.features import FeatureTensors, featurize, layout_of
from fedpersona.data.schema import (
    BooleanFeature,
    CategoricalFeature,
    NumericFeature,
    Schema,
    SequenceFeature,
    TextFeature,
)
from fedpersona.data.synthetic import generate_silo, synthetic_schema
from fedpersona.data.tables import Table, validate_frame
from fedpersona.errors import ConfigError
from fedpersona.federation.client_app import build_client_app
from fedpersona.federation.messages import encode_settings
from fedpersona.federation.partner import PartnerData, build_model
from fedpersona.model.encoder import random_keep, token_presence
from fedpersona.privacy.manifest import MANIFEST

ROWS = 200
ROW = 7  # the row that changes
HUGE = "1e30"
UNSEEN = "zz-never-seen-category-ω"
LONG_TEXT = " ".join(f"word{i}" for i in range(5000))
MODEL = ModelSettings(architecture="encoder", token_dim=8, embed_dim=8, hidden=8, blocks=1)
TRAINING = TrainingSettings(batch_size=32, local_epochs=1, sample_rate=None, optimizer="adam", lr=0.01)
# The query items derived from a row count: they come from the declared public_rows, so they
# must not move when a row is added (sample rate = 1 / ceil(public_rows / batch), steps, sigma).
COUNT_DERIVED = {"rows", "sample_rate", "steps_per_round", "noise_multiplier"}


def _frame(kind: str) -> pd.DataFrame:
    """The synthetic silo as a file would hold it: every cell a string."""
    return generate_silo(kind, ROWS, seed=3).frame.astype(str)


def _extreme(schema: Schema, frame: pd.DataFrame, row: int, *, at_bounds: bool = False) -> pd.DataFrame:
    """``frame`` with every feature and label of ``row`` set to an extreme value.

    ``at_bounds``: numbers at the schema's public bounds instead of +-1e30 (same categories,
    text and labels), to check that 1e30 is indistinguishable from the upper bound.
    """
    out = frame.copy()
    for feat in schema.features:
        if isinstance(feat, NumericFeature):
            out.loc[row, feat.column] = repr(feat.hi) if at_bounds else HUGE
        elif isinstance(feat, BooleanFeature):
            out.loc[row, feat.column] = feat.true_values[0]
        elif isinstance(feat, CategoricalFeature):
            assert feat.unseen == "other", "this test needs unseen categories to be accepted"
            out.loc[row, feat.column] = UNSEEN
        elif isinstance(feat, TextFeature):
            out.loc[row, feat.column] = LONG_TEXT
        elif isinstance(feat, SequenceFeature) and feat.element == "numeric":
            for step, col in enumerate(feat.columns):
                high = step % 2 == 0
                if at_bounds:
                    out.loc[row, col] = repr(feat.hi if high else feat.lo)
                else:
                    out.loc[row, col] = HUGE if high else "-" + HUGE
        else:
            assert isinstance(feat, SequenceFeature)
            for col in feat.columns:
                out.loc[row, col] = UNSEEN
    for label in schema.labels:
        out.loc[row, label.column] = label.positive[0]
    return out


def _table(schema: Schema, frame: pd.DataFrame) -> Table:
    return validate_frame(schema, frame, source="test")


def _rows_equal(a: FeatureTensors, i: int, b: FeatureTensors, j: int) -> bool:
    """Row ``i`` of ``a`` equals row ``j`` of ``b`` in every tensor (NaN == NaN)."""
    assert a.tensors.keys() == b.tensors.keys()
    return all(torch.equal(a.tensors[k][i].nan_to_num(-7.0), b.tensors[k][j].nan_to_num(-7.0)) for k in a.tensors)


# --- featurization --------------------------------------------------------------------------


def test_one_changed_row_changes_only_its_own_tensors(kind: str) -> None:
    schema = synthetic_schema(kind)
    frame = _frame(kind)
    base = featurize(_table(schema, frame))
    changed = featurize(_table(schema, _extreme(schema, frame, ROW)))
    assert base.layout == changed.layout == layout_of(schema)
    assert base.tensors.keys() == changed.tensors.keys()
    others = [i for i in range(ROWS) if i != ROW]
    for key in base.tensors:
        assert base.tensors[key].shape == changed.tensors[key].shape, key
        assert torch.equal(base.tensors[key][others].nan_to_num(-7.0), changed.tensors[key][others].nan_to_num(-7.0)), (
            f"{kind}: tensor '{key}' of other rows changed when row {ROW} changed"
        )
    assert not _rows_equal(base, ROW, changed, ROW), "the extreme row did not change at all"


def test_a_row_featurizes_the_same_alone_as_in_any_table(kind: str) -> None:
    schema = synthetic_schema(kind)
    table = _table(schema, _extreme(schema, _frame(kind), ROW))
    full = featurize(table)
    for i in (0, ROW, ROWS - 1):
        alone = featurize(table.take(np.array([i])))
        assert alone.layout == full.layout
        assert _rows_equal(alone, 0, full, i), f"row {i} featurizes differently alone"
    # Removing a row (the DP neighbour) leaves every remaining row's tensors as they were.
    keep = np.array([i for i in range(ROWS) if i != ROW])
    fewer = featurize(table.take(keep))
    assert all(_rows_equal(fewer, n, full, i) for n, i in enumerate(keep))


def test_extreme_values_are_squashed_into_the_public_bounds(kind: str) -> None:
    schema = synthetic_schema(kind)
    frame = _frame(kind)
    extreme = featurize(_table(schema, _extreme(schema, frame, ROW)))
    at_bounds = featurize(_table(schema, _extreme(schema, frame, ROW, at_bounds=True)))
    layout = layout_of(schema)
    # 1e30 is indistinguishable from the declared upper bound (and -1e30 from the lower one).
    for key, value in extreme.tensors.items():
        if key == "scalar" or (key.startswith("seqnum") and not key.endswith("_present")):
            assert torch.equal(value[ROW], at_bounds.tensors[key][ROW]), key
            assert torch.isfinite(value).all() and value.min() >= 0 and value.max() <= 1, key
    numeric_names = {f.name for f in schema.features if isinstance(f, NumericFeature)}
    numeric = [i for i, name in enumerate(layout.scalar_names) if name in numeric_names]
    assert torch.equal(extreme.tensors["scalar"][ROW, numeric], torch.ones(len(numeric)))
    # Unseen categories map to the shared "other" code; the long text to max_tokens ids.
    for j, feat in enumerate(f for f in schema.features if isinstance(f, CategoricalFeature)):
        code = int(extreme.tensors["cat"][ROW, j]) - layout.cat_offsets[j]
        if feat.vocabulary is not None:
            assert code == 0
        assert 0 <= code < feat.cardinality
    for t, feat in enumerate(f for f in schema.features if isinstance(f, TextFeature)):
        ids = extreme.tensors[f"text{t}"]
        assert ids.shape[1] == feat.max_tokens
        assert bool((ids[ROW] > 0).all()) and int(ids.max()) <= feat.buckets


# --- what the partner says about itself -----------------------------------------------------


def _client_dir(tmp_path: Path, name: str, kind: str, frame: pd.DataFrame) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    schema_text = resources.files("fedpersona").joinpath(f"schemas/synthetic_{kind}.toml").read_text()
    (folder / "schema.toml").write_text(schema_text, encoding="utf-8")
    frame.to_csv(folder / "data.csv", index=False)
    dump_toml(
        folder / "client.toml",
        {
            "partner": {"name": "partner-a", "kind": kind, "state_dir": "state"},
            "data": {"path": "data.csv", "schema": "schema.toml", "public_rows": 160},
            "privacy": {"target_epsilon": 2.0, "delta": 1e-5},
        },
    )
    return folder / "client.toml"


def _query_info(client_toml: Path) -> dict[str, object]:
    metadata = Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=7,
        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
        message_type="query",
    )  # fmt: skip
    message: Message = make_message(
        metadata, RecordDict({"config": encode_settings(MODEL, TRAINING, num_rounds=2, seed=0)})
    )
    context = Context(
        run_id=1, node_id=7, node_config={"client-config": str(client_toml)}, state=RecordDict(), run_config={}
    )
    reply = build_client_app()(message, context)
    assert not reply.has_error(), reply.error.reason
    assert set(reply.content) == {"info"}
    return dict(reply.content["info"])


def test_query_reply_ignores_a_changed_row_and_an_added_one(tmp_path: Path) -> None:
    kind = "ecommerce"
    schema = synthetic_schema(kind)
    frame = _frame(kind)
    changed = _extreme(schema, frame, ROW)
    added = pd.concat([frame, changed.iloc[[ROW]].assign(**{schema.id_column or "": "E999999"})], ignore_index=True)
    base_info = _query_info(_client_dir(tmp_path, "base", kind, frame))
    changed_info = _query_info(_client_dir(tmp_path, "changed", kind, changed))
    added_info = _query_info(_client_dir(tmp_path, "added", kind, added))

    # Every item of the reply is declared public in the release manifest.
    public = {item.key for item in MANIFEST if item.message == "query" and item.record == "info"}
    assert all(item.status == "public" for item in MANIFEST if item.message == "query")
    assert set(base_info) <= public
    assert COUNT_DERIVED <= public

    assert changed_info == base_info, {k: (base_info[k], changed_info[k]) for k in base_info}
    # One user more moves nothing: the count and the plan follow the declaration only.
    assert added_info == base_info, {k: (base_info[k], added_info[k]) for k in base_info}
    assert base_info["rows"] == 160


def test_the_split_is_row_local(tmp_path: Path) -> None:
    from fedpersona.federation.partner import load_partner_data, row_keys, split_key, train_mask

    kind = "finance"
    frame = _frame(kind)
    schema = synthetic_schema(kind)
    extra = frame.iloc[[ROW]].assign(**{schema.id_column or "": "F999999"})
    cfg = load_partner_config(_client_dir(tmp_path, "base", kind, frame))
    key = split_key(cfg)
    base = load_partner_data(cfg)
    bigger = load_partner_data(load_partner_config(_client_dir(tmp_path, "bigger", kind, frame)))
    # One more user, inserted at the top of the file, split with the same partner's key.
    keys_before = row_keys(base.table)
    keys_after = row_keys(validate_frame(schema, pd.concat([extra, frame], ignore_index=True), source="x"))
    train_before = {k for k, t in zip(keys_before, train_mask(keys_before, key, 0.2), strict=True) if t}
    train_after = {k for k, t in zip(keys_after, train_mask(keys_after, key, 0.2), strict=True) if t}
    assert train_after - {"F999999"} == train_before
    # The partner's data uses exactly that split; another partner's secret key splits otherwise.
    assert len(base.train) == len(train_before) and len(base.train) + len(base.test) == len(frame)
    assert len(bigger.train) != len(base.train) or not np.array_equal(
        train_mask(keys_before, split_key(load_partner_config(tmp_path / "bigger" / "client.toml")), 0.2),
        train_mask(keys_before, key, 0.2),
    )


# --- sensitivity ------------------------------------------------------------------------------


def _per_sample_grads(model: GradSampleModule, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients, flattened over all parameters: (B, n_params)."""
    model.zero_grad(set_to_none=True)
    model(batch, keep).sum().backward()
    n = keep.shape[0]
    grads = [p.grad_sample.reshape(n, -1) for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads, 1)


def _summed_clipped_gradient(
    model: GradSampleModule, batch: dict[str, torch.Tensor], keep: torch.Tensor, max_grad_norm: float
) -> torch.Tensor:
    """Sum of per-sample clipped gradients, as Opacus' DPOptimizer computes it (noise 0)."""
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=keep.shape[0],
        loss_reduction="sum",
    )
    optimizer.zero_grad(set_to_none=True)
    model(batch, keep).sum().backward()
    assert optimizer.pre_step()  # clip, accumulate, add (zero) noise
    summed = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    optimizer.zero_grad(set_to_none=True)
    return summed


def test_an_extreme_row_cannot_raise_the_sensitivity(kind: str) -> None:
    schema = synthetic_schema(kind)
    table = _table(schema, _extreme(schema, _frame(kind), ROW))
    features = featurize(table)
    data = PartnerData(
        schema=schema, train=features, test=features, personas_test=None, table=table,
        train_index=np.arange(len(table)), dense=dense_views(table),
    )  # fmt: skip
    torch.manual_seed(0)
    model = GradSampleModule(build_model(data, MODEL, seed=0, device=torch.device("cpu")))
    index = torch.arange(16)  # contains ROW
    batch = features.batch(index)
    keep = random_keep(token_presence(features.layout, batch), MODEL.mask_rate, torch.Generator().manual_seed(0))
    grads = _per_sample_grads(model, batch, keep)
    assert torch.isfinite(grads).all()
    norms = grads.norm(dim=1)
    # Clipping must be active for the extreme row, or the check below would be vacuous.
    max_grad_norm = min(PrivacySettings().max_grad_norm, float(norms[ROW]) / 2)
    assert float(norms[ROW]) > max_grad_norm

    # Sensitivity as DP-SGD sees it: removing the extreme row moves Opacus' summed clipped
    # gradient by at most C (per-sample terms are independent: no batch statistics).
    others = index[index != ROW]
    with_row = _summed_clipped_gradient(model, batch, keep, max_grad_norm)
    without = _summed_clipped_gradient(model, features.batch(others), keep[others], max_grad_norm)
    shift = float((with_row - without).norm())
    assert 0 < shift <= max_grad_norm * (1 + 1e-5)
    assert shift == pytest.approx(max_grad_norm, rel=1e-4)  # the extreme row was clipped to C


def test_an_unbounded_clipping_norm_is_refused() -> None:
    for bad in (float("inf"), float("nan"), 0.0, -1.0, True):
        with pytest.raises(ConfigError, match="max_grad_norm"):
            PrivacySettings.checked(max_grad_norm=bad)
