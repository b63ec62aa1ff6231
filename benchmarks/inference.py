"""Inference: users/s of :func:`fedpersona.model.inference.infer_file` end to end (read CSV,
validate, featurize, encode, assign, write CSV) vs :func:`assign_personas` on featurized rows
vs the encoder's forward pass alone, on synthetic e-commerce users and the default encoder."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.workload import best_time
from fedpersona.config.settings import ModelSettings
from fedpersona.data.features import featurize, layout_of
from fedpersona.data.schema import slot_id
from fedpersona.data.synthetic import generate_frame, synthetic_schema
from fedpersona.data.tables import validate_frame
from fedpersona.model.encoder import PersonaEncoder
from fedpersona.model.inference import assign_personas, infer_file
from fedpersona.model.scopes import parameter_scope

KIND, PERSONAS, BATCH = "ecommerce", 6, 1024


def run(*, quick: bool) -> dict[str, Any]:
    users = 100_000 if quick else 1_000_000
    schema = synthetic_schema(KIND)
    torch.manual_seed(0)
    model = PersonaEncoder(layout_of(schema), ModelSettings()).eval()
    slot = slot_id(schema.kind, schema.fingerprint())
    arrays = {
        (name if parameter_scope(name) == "global" else f"{slot}/{name}"): value.numpy()
        for name, value in model.state_dict().items()
        if parameter_scope(name) != "local"
    }
    card = {"model": model.config.model_dump()}
    prototypes = np.random.default_rng(0).normal(size=(PERSONAS, model.config.embed_dim)).astype(np.float32)
    frame, _ = generate_frame(KIND, users, rng=np.random.default_rng(0))
    repeats = 2
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "users.csv"
        frame.to_csv(source, index=False)
        size = source.stat().st_size

        def end_to_end_run() -> None:
            infer_file(
                arrays=arrays, card=card, schema=schema, prototypes=prototypes,
                data_path=source, out_path=Path(folder) / "personas.csv", batch_size=BATCH,
            )  # fmt: skip

        end_to_end = best_time(end_to_end_run, repeats)
    features = featurize(validate_frame(schema, frame, source="benchmark"))
    prepare = best_time(lambda: featurize(validate_frame(schema, frame, source="benchmark")), repeats)
    assign = best_time(lambda: assign_personas(model, features, prototypes, batch_size=BATCH), repeats)

    @torch.no_grad()
    def forward_run() -> None:
        for first in range(0, users, BATCH):
            model.embed(features.batch(torch.arange(first, min(users, first + BATCH))))

    forward = best_time(forward_run, repeats)
    timings = [
        ("infer_file end to end (CSV in, CSV out)", end_to_end),
        ("validate + featurize (in memory)", prepare),
        ("assign_personas on featurized rows", assign),
        ("encoder forward pass alone", forward),
    ]
    return {
        "title": "Inference",
        "tables": [
            {
                "name": f"{users:,} synthetic e-commerce users ({size / 1e6:.0f} MB CSV), {PERSONAS} personas, "
                f"batch {BATCH}, CPU, {torch.get_num_threads()} torch threads",
                "columns": ["stage", "seconds", "users/s", "share of end to end"],
                "rows": [[n, round(s, 2), round(users / s), f"{s / end_to_end:.0%}"] for n, s in timings],
            }
        ],
        "notes": [f"Best (minimum) of {repeats} runs of each stage; files in a temporary folder on local disk."],
        "data": {"users": users, "csv_bytes": size, "seconds": dict(timings)},
    }
