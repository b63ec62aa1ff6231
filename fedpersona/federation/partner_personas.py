"""A partner's side of the persona protocol, independent of the transport: its releases, the
assignment of its users and their persona cards, and inference with a published model.

The Flower ClientApp (:mod:`fedpersona.federation.client_app`) calls :func:`persona_release` and
:func:`persona_round`; ``fedpersona infer`` calls :func:`infer_users`. Everything here reads the
partner's own table through :mod:`fedpersona.federation.partner` (loaded once per process).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedpersona.config.settings import PartnerConfig, TrainingSettings
from fedpersona.data.dense import dense_layout, persona_view
from fedpersona.data.schema import SequenceFeature, slot_id
from fedpersona.data.schema_reader import partner_schema
from fedpersona.data.tables import Table
from fedpersona.errors import ConfigError
from fedpersona.model.inference import InferenceSummary, infer_file
from fedpersona.personas.mixture import STATS_MECHANISM, Mixture, stats_release
from fedpersona.personas.protocol import personas_from_arrays, result_from_json
from fedpersona.personas.space import GRAM_MECHANISM, PersonaSpace, gram_release
from fedpersona.privacy.ledger import PrivacyLedger
from fedpersona.privacy.randomness import SecretRandomness

__all__ = ["assign_rows", "infer_users", "persona_release", "persona_round", "persona_width"]


def persona_width(cfg: PartnerConfig) -> int:
    """Columns of this partner's persona view: a function of its schema alone (public)."""
    return dense_layout(partner_schema(cfg)).persona_width


def persona_release(
    *,
    cfg: PartnerConfig,
    training: TrainingSettings,
    config: dict[str, Any],
    arrays: dict[str, np.ndarray],
    server_round: int,
) -> dict[str, np.ndarray]:
    """One release of the persona protocol (:mod:`fedpersona.personas.protocol`) from this
    partner's training rows: its noisy Gram matrix (``persona.kind = "gram"``) or its noisy
    EM statistics for the mixture in ``arrays`` (``"stats"``), charged to the ledger first.

    The noise multiplier is the plan's (``gram_noise`` or ``em_noise``), never the message's;
    the public constants the message carries (clips, offset, the count-noise weight, the
    space and the mixture) only shape the release, and the noise is scaled to the same clips,
    so no choice of them weakens the guarantee. The noise comes from the partner's secret
    stream, keyed by the ledger entry, so a repeated request draws fresh noise.
    """
    from fedpersona.federation.partner import load_partner_data, load_plan

    data = load_partner_data(cfg)
    plan = load_plan(cfg, data, training, 1)
    kind = str(config["persona.kind"])
    if kind not in ("gram", "stats"):
        raise ValueError(f"unknown persona release {kind!r}")
    mechanism = GRAM_MECHANISM if kind == "gram" else STATS_MECHANISM
    noise, seq = 0.0, 0
    if plan.private:
        planned = plan.gram_noise if kind == "gram" else plan.em_noise
        if not plan.persona_releases or planned is None:
            raise ConfigError(
                f"{cfg.name}: this partner's noise plan reserved no budget for personas (it was planned before "
                "the federation announced them); it refuses the release"
            )
        noise = float(planned)
        seq = (
            PrivacyLedger(cfg.state_dir, settings=cfg.privacy)
            .charge(round=server_round, mechanism=mechanism, noise_multiplier=noise, sample_rate=1.0, steps=1)
            .seq
        )
    # The noise comes from the partner's secret stream, never from the message.
    randomness = SecretRandomness.for_mechanism(cfg.privacy.noise_seed, cfg.name, mechanism, server_round, seq)
    x = data.persona_train
    if kind == "gram":
        packed = gram_release(
            x, clip=float(config["persona.row_clip"]), offset=float(config["persona.offset"]),
            noise_multiplier=noise, randomness=randomness if noise else None,
        )  # fmt: skip
        return {"gram": packed}
    space, mixture = personas_from_arrays(arrays, metric=str(config["persona.metric"]))
    stats = stats_release(
        space.embed(x), mixture, soft=bool(config["persona.soft"]), z_clip=space.z_clip, noise_multiplier=noise,
        count_noise=float(config["persona.count_noise"]), randomness=randomness if noise else None,
    )  # fmt: skip
    return {"counts": stats.counts, "sums": stats.sums}


def assign_rows(space: PersonaSpace, mixture: Mixture, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(hard (n,), posterior (n, K), z (n, p))`` of every row of a persona view: a public
    function of each row once the space and the mixture are released (free; stays here)."""
    z = space.embed(np.asarray(rows, dtype=np.float64))
    if not len(z):
        return np.zeros(0, dtype=np.int64), np.zeros((0, mixture.k)), z
    scores = mixture.log_posterior(z)
    posterior = np.exp(scores - scores.max(axis=1, keepdims=True))
    posterior /= posterior.sum(axis=1, keepdims=True)
    return scores.argmax(axis=1).astype(np.int64), posterior, z


def persona_round(
    *,
    cfg: PartnerConfig,
    config: dict[str, Any],
    arrays: dict[str, np.ndarray],
    seed: int,
    min_users: int = 10,
) -> dict[str, Any]:
    """Assign every user to a persona of its slot and write this partner's persona cards, locally.

    Nothing here is sent: the cards and the persona-by-feature profile (the heatmap of the
    run report; ``state_dir/personas.json``) and each user's persona
    (``state_dir/assignments.csv``) stay at the partner. The
    returned metrics are held-out evaluation metrics (opt-in, not DP) for the server.
    """
    from fedpersona.federation.partner import _atomic_write, _seed_for, load_partner_data
    from fedpersona.personas.cards import feature_profile, hit_rate_at_k, persona_cards

    data = load_partner_data(cfg)
    space, mixture = personas_from_arrays(arrays, metric=str(config.get("persona.metric", "tied")))
    assignments = assign_rows(space, mixture, data.dense.persona)[0]
    k = mixture.k
    category = None
    if cfg.kind == "ecommerce":
        category = next(
            (f.name for f in data.schema.features if isinstance(f, SequenceFeature) and f.element == "categorical"),
            None,
        )
    cards = persona_cards(
        data.table,
        assignments,
        k=k,
        rng=np.random.default_rng(_seed_for(seed, cfg.name, "cards")),
        min_users=min_users,
        category_feature=category,
    )
    lines = ["user_id,persona"] + [f"{uid},{int(a)}" for uid, a in zip(data.table.ids, assignments, strict=True)]
    _atomic_write(Path(cfg.state_dir) / "assignments.csv", ("\n".join(lines) + "\n").encode())
    path = Path(cfg.state_dir) / "personas.json"
    _atomic_write(
        path,
        json.dumps(
            {
                "partner": cfg.name,
                "kind": cfg.kind,
                "k": k,
                "cards": [c.to_dict() for c in cards],
                "profile": feature_profile(data.table, assignments, k=k, min_users=min_users).to_dict(),
            },
            indent=2,
            default=str,
        ).encode(),
    )
    metrics: dict[str, Any] = {"personas_found": len(np.unique(assignments))}
    if data.personas_test is not None:
        truth = _synthetic_personas(cfg)
        if truth is not None and len(truth) == len(assignments):
            from sklearn.metrics import adjusted_rand_score  # the query and the releases start without it

            metrics["persona_ari"] = float(adjusted_rand_score(truth, assignments))
    fidelity = [c.fidelity for c in cards if c.fidelity is not None]
    if fidelity:
        metrics["surrogate_fidelity"] = float(fidelity[0])
    if category is not None:  # a categorical sequence: its first present step is hidden
        # Does a persona's top-3 beat the silo's most popular 3 at guessing each user's most
        # recent category (hidden while the statistics are made)? Opt-in, NOT DP, like the ARI.
        hits = hit_rate_at_k(data.table, assignments, k=k, category_feature=category, top_k=3, min_users=min_users)
        if hits.users:
            metrics["rec_hit_rate"] = hits.persona
            metrics["rec_hit_rate_popularity"] = hits.popularity
    return metrics


def _synthetic_personas(cfg: PartnerConfig) -> np.ndarray | None:
    if cfg.data is not None:
        return None
    from fedpersona.data.synthetic import generate_silo

    mix = np.asarray(cfg.synthetic_mix) if cfg.synthetic_mix is not None else None
    return generate_silo(cfg.kind, int(cfg.synthetic_rows or 0), seed=cfg.synthetic_seed, mix=mix).persona


def infer_users(
    cfg: PartnerConfig,
    *,
    model: str | Path,
    public_key: bytes | None,
    data_path: str | Path,
    out_path: str | Path,
    chunk_rows: int = 100_000,
    include_embedding: bool = False,
    progress: Any = None,
) -> InferenceSummary:
    """Assign personas to a file of this partner's users with a verified model folder.

    The model is verified against ``public_key`` (the federation's; ``None`` only for a folder
    the user made, with ``--no-verify``). The partner's personas are those of its slot (its
    kind and schema fingerprint): the released persona space and mixture, applied to each
    row's public persona view (:func:`assign_rows`); no encoder runs.
    """
    from fedpersona.model.artifacts import ArtifactError, verify_model

    _, card = verify_model(model, public_key=public_key)
    schema = partner_schema(cfg)
    slot = slot_id(schema.kind, schema.fingerprint())
    slots = (card.get("personas") or {}).get("slots") or {}
    if not slots:
        raise ArtifactError(f"{model}: the model carries no personas (the run found none)")
    if slot not in slots:
        kinds = ", ".join(sorted(str(v.get("label", k)) for k, v in slots.items()))
        raise ArtifactError(
            f"{model}: the model has no personas for this partner's schema ({schema.kind}, fingerprint "
            f"{schema.fingerprint()[:12]}); it has personas for: {kinds}. Infer with the schema the federation "
            "trained with"
        )
    try:
        result = result_from_json(slots[slot])
    except ValueError as exc:
        raise ArtifactError(f"{model}: the personas of {slot} are damaged ({exc})") from None
    layout = dense_layout(schema)
    if layout.persona_width != result.space.dim:
        raise ArtifactError(
            f"{model}: the personas of {slot} expect {result.space.dim} persona columns, the schema gives "
            f"{layout.persona_width}"
        )

    def view(table: Table) -> np.ndarray:
        return persona_view(table)

    def assign(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hard, posterior, z = assign_rows(result.space, result.mixture, rows)
        return hard, posterior.astype(np.float32), z.astype(np.float32)

    return infer_file(
        schema=schema, view=view, assign=assign, k=result.mixture.k, dim=result.space.dims, data_path=data_path,
        out_path=out_path, chunk_rows=chunk_rows, include_embedding=include_embedding, progress=progress,
    )  # fmt: skip
