"""Parameter scopes, declared once: who averages each part of the persona model.

- ``adapter`` (scope ``kind``): averaged only among partners of one kind and one schema (one
  adapter slot, :func:`fedpersona.data.schema.slot_id`).
- ``label_model`` (scope ``kind``): the cross-fitted logistic regressions of
  :mod:`fedpersona.model.linear`, averaged within a slot like the adapter.
- ``trunk`` (scope ``global``): averaged over every partner.
- ``recon_head``, ``scalar_stats`` and ``label_head`` (scope ``local``): never leave the partner.

The aggregation strategy, secure aggregation, the partner's reply and the model artifact all
read the scope of a parameter from its state-dict name here. This module imports no PyTorch,
so the coordinator can obey the scopes without the training stack.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["SCOPES", "Scope", "parameter_scope"]

Scope = Literal["global", "kind", "local"]

SCOPES: dict[str, Scope] = {
    "adapter": "kind",
    "label_model": "kind",
    "trunk": "global",
    "recon_head": "local",
    "scalar_stats": "local",
    "label_head": "local",
}


def parameter_scope(name: str) -> Scope:
    """The scope of a state-dict key such as ``trunk.pool.weight``."""
    prefix = name.split(".", 1)[0]
    if prefix not in SCOPES:
        raise KeyError(f"parameter '{name}' belongs to no declared scope ({', '.join(SCOPES)})")
    return SCOPES[prefix]
