"""Shared fixtures: small synthetic partners and their configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedpersona.config.settings import ModelSettings, PartnerConfig, PrivacySettings
from fedpersona.federation.partner import PartnerData, load_partner_data

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def partner_config(
    tmp_path: Path, kind: str = "ecommerce", *, rows: int = 400, epsilon: float = 3.0, seed: int = 1
) -> PartnerConfig:
    return PartnerConfig(
        name=f"{kind}-test",
        kind=kind,
        schema=None,
        data=None,
        state_dir=str(tmp_path / f"state-{kind}"),
        privacy=PrivacySettings(target_epsilon=epsilon),
        synthetic_rows=rows,
        synthetic_seed=seed,
    )


@pytest.fixture(params=["ecommerce", "finance", "health"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def small_data(tmp_path: Path, kind: str) -> PartnerData:
    return load_partner_data(partner_config(tmp_path, kind, rows=300))


@pytest.fixture
def model_cfg() -> ModelSettings:
    return ModelSettings(architecture="encoder", token_dim=16, embed_dim=8, hidden=16, blocks=1)
