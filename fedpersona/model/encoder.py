"""The persona encoder: kind-scoped feature adapter, global trunk, local heads.

Every layer is an ``nn.Linear``, ``nn.Embedding`` or ``nn.LayerNorm``, each used once per
forward pass, so Opacus computes per-sample gradient norms for all of them (ghost clipping
for Linear and Embedding, exact per-sample gradients for LayerNorm). No BatchNorm.

Each top-level module's scope (``adapter``: kind, ``trunk``: global, the heads and
``scalar_stats``: local) is declared once, in :mod:`fedpersona.model.scopes`, and the
aggregation strategy obeys it.

**Numbers enter centred and scaled by their public typical range.** A schema may declare,
per number, ``typical = [low, high]``: about the middle 90% of users, public domain knowledge
like the bounds. The adapter feeds ``(value - centre) / spread`` (fixed buffers made from the
schema, see :func:`fedpersona.data.features.layout_of`) instead of the bounds-scaled value, so a
number whose users fill a twentieth of its bounds varies as much as a yes/no flag. Under
DP-SGD this matters: with a typical range on every number of the synthetic silos, persona
recovery at epsilon 3 in a plain-loop federation of the default scenario rose from an ARI of
0.25 to 0.50 (two seeds, ``benchmarks/persona_ablation.py``, ``docs/results.md``). Nothing is
computed from the partner's rows.

**Why the reconstruction is standardised by learned statistics.** Scalars arrive scaled to
[0, 1] by their public bounds, so a feature whose users spread over a tenth of its declared
range contributes a hundredth of the squared error of a boolean; left like that, the
embedding learns the booleans and categories and ignores most numbers, and the personas
follow the few loud columns. Each scalar's error is therefore divided by its variance over
the partner's users. That variance is a data-dependent statistic, so it is not computed from
the table: it is a pair of local parameters per feature (``scalar_stats``: mean and log
variance) fitted by the same DP-SGD steps as the rest of the model, to the Gaussian
likelihood of the observed values. Everything they learn passes through per-sample clipping
and noise and is covered by the DP-SGD ledger entries, they never leave the partner, and the
weights they give the reconstruction are detached (they scale the loss, they are not trained
by it). An auditor sees no extra release and no statistic outside the accountant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedpersona.config.settings import ModelSettings
from fedpersona.data.features import FeatureLayout

__all__ = [
    "FeatureAdapter",
    "PersonaEncoder",
    "PersonaTrunk",
    "ScalarStats",
    "random_keep",
    "token_presence",
]


class FeatureAdapter(nn.Module):
    """Turns one user's row into a set of d-dimensional tokens (scope: kind)."""

    scalar_centre: torch.Tensor
    scalar_spread: torch.Tensor
    seq_num_centre: torch.Tensor
    seq_num_spread: torch.Tensor

    def __init__(self, layout: FeatureLayout, d: int) -> None:
        super().__init__()
        self.layout = layout
        # Only layers the schema uses exist: a parameter that gets no gradient would break
        # Opacus' per-sample norm computation.
        n_scalar = len(layout.scalar_names)
        # A scalar token is value * scale[f] + shift[f]: the shift also identifies the feature.
        self.scalar_scale = nn.Embedding(n_scalar, d) if n_scalar else None
        self.scalar_shift = nn.Embedding(n_scalar, d) if n_scalar else None
        self.register_buffer("scalar_index", torch.arange(n_scalar), persistent=False)
        # Public centring and scaling of numbers from the schema's typical ranges (fixed
        # buffers, not trained, not in the state dict: the schema recreates them).
        centre, spread = _standard_buffers(layout.scalar_standard, n_scalar)
        self.register_buffer("scalar_centre", centre, persistent=False)
        self.register_buffer("scalar_spread", spread, persistent=False)
        centre, spread = _standard_buffers(layout.seq_num_standard, len(layout.seq_num_lengths))
        self.register_buffer("seq_num_centre", centre, persistent=False)
        self.register_buffer("seq_num_spread", spread, persistent=False)
        self.cat = nn.Embedding(sum(layout.cat_cardinalities), d) if layout.cat_names else None
        self.texts = nn.ModuleList(nn.Embedding(b + 1, d) for b in layout.text_buckets)
        self.seq_num = nn.ModuleList(nn.Linear(2 * n, d) for n in layout.seq_num_lengths)
        self.seq_cat = nn.ModuleList(
            nn.Embedding(n * card, d)
            for n, card in zip(layout.seq_cat_lengths, layout.seq_cat_cardinalities, strict=True)
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns tokens ``(B, T, d)`` and presence ``(B, T)`` (False = missing value)."""
        tokens: list[torch.Tensor] = []
        scalar = batch["scalar"]  # (B, S)
        if self.scalar_scale is not None and self.scalar_shift is not None:
            index = self.scalar_index.expand(scalar.shape[0], -1).contiguous()  # type: ignore[operator]
            value = _standardise(scalar, self.scalar_centre, self.scalar_spread)
            tokens.append(value.unsqueeze(-1) * self.scalar_scale(index) + self.scalar_shift(index))
        if self.cat is not None:
            tokens.append(self.cat(batch["cat"]))  # (B, C, d)
        for i, emb in enumerate(self.texts):
            ids = batch[f"text{i}"]  # (B, L)
            mask = (ids > 0).unsqueeze(-1).to(scalar.dtype)
            summed = (emb(ids) * mask).sum(1)
            tokens.append((summed / mask.sum(1).clamp(min=1.0)).unsqueeze(1))
        for i, lin in enumerate(self.seq_num):
            values = _standardise(batch[f"seqnum{i}"], self.seq_num_centre[i], self.seq_num_spread[i])
            mask = batch[f"seqnum{i}_present"].to(values.dtype)
            tokens.append(lin(torch.cat([values * mask, mask], 1)).unsqueeze(1))
        for i, emb in enumerate(self.seq_cat):
            codes = batch[f"seqcat{i}"]
            mask = batch[f"seqcat{i}_present"].unsqueeze(-1).to(scalar.dtype)
            summed = (emb(codes) * mask).sum(1)
            tokens.append((summed / mask.sum(1).clamp(min=1.0)).unsqueeze(1))
        return torch.cat(tokens, 1), token_presence(self.layout, batch)


_STANDARD_CLAMP = 6.0  # inputs beyond 6 spreads from the typical centre are held there


def _standard_buffers(standard: tuple[tuple[float, float], ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not standard:
        return torch.zeros(n), torch.ones(n)
    return torch.tensor([c for c, _ in standard]), torch.tensor([s for _, s in standard])


def _standardise(values: torch.Tensor, centre: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """``(values - centre) / spread``, held within +-6 so that a rare extreme value (legal
    within the bounds) cannot swamp a token. Identity for centre 0, spread 1 on [0, 1]."""
    return ((values - centre) / spread).clamp(-_STANDARD_CLAMP, _STANDARD_CLAMP)


class _Block(nn.Module):
    """Pre-norm residual MLP applied to each token independently."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        return h + self.down(F.gelu(self.up(self.norm(h))))


class PersonaTrunk(nn.Module):
    """Any number of tokens -> unit-norm persona embedding z (scope: global)."""

    def __init__(self, config: ModelSettings) -> None:
        super().__init__()
        d = config.token_dim
        self.blocks = nn.ModuleList(_Block(d, config.hidden) for _ in range(config.blocks))
        self.score = nn.Linear(d, 1)
        self.mix = nn.Linear(2 * d, config.hidden)
        self.out = nn.Linear(config.hidden, config.embed_dim)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, T, d), ``keep`` (B, T) bool -> z (B, embed_dim), unit norm."""
        h = tokens
        for block in self.blocks:
            h = block(h)
        weight = keep.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        scores = self.score(h).masked_fill(~keep.unsqueeze(-1), -1e9)  # (B, T, 1)
        attn = torch.softmax(scores, dim=1) * weight
        attended = (attn * h).sum(1) / attn.sum(1).clamp(min=1e-9)  # (B, d)
        mean = (h * weight).sum(1) / weight.sum(1).clamp(min=1.0)  # (B, d)
        z = self.out(F.gelu(self.mix(torch.cat([attended, mean], 1))))
        return F.normalize(z, dim=1)


_LOG_VAR_RANGE = (-9.0, 1.0)  # variances of [0, 1] values: from (0.011 sd)^2 to well above 1/4


class ScalarStats(nn.Module):
    """Learned mean and log variance of each [0, 1]-scaled scalar feature (scope: local).

    Two ``nn.Embedding(1, S)`` tables looked up at index 0 for every row, so Opacus has
    per-sample gradients for them. Initialised to the uniform distribution on [0, 1].
    """

    def __init__(self, n_scalar: int) -> None:
        super().__init__()
        self.mean = nn.Embedding(1, n_scalar)
        self.log_var = nn.Embedding(1, n_scalar)
        with torch.no_grad():
            self.mean.weight.fill_(0.5)
            self.log_var.weight.fill_(math.log(1.0 / 12.0))

    def forward(self, values: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample Gaussian negative log likelihood of the present values ``(B,)`` (mean
        over present features) and the per-feature inverse variances ``(B, S)``, detached."""
        zero = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
        mean = self.mean(zero)
        log_var = self.log_var(zero).clamp(*_LOG_VAR_RANGE)
        mask = present.to(values.dtype)
        nll = 0.5 * ((values - mean) ** 2 * torch.exp(-log_var) + log_var)
        per_sample = (nll * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return per_sample, torch.exp(-log_var).detach()


class PersonaEncoder(nn.Module):
    """Adapter + trunk + local heads; owns its self-supervised and label losses."""

    def __init__(self, layout: FeatureLayout, config: ModelSettings) -> None:
        super().__init__()
        self.layout = layout
        self.config = config
        self.adapter = FeatureAdapter(layout, config.token_dim)
        self.trunk = PersonaTrunk(config)
        n_scalar = len(layout.scalar_names)
        n_cat = sum(layout.cat_cardinalities)
        self.recon_head = (
            nn.Sequential(
                nn.Linear(config.embed_dim, config.hidden),
                nn.GELU(),
                nn.Linear(config.hidden, n_scalar + n_cat),
            )
            if n_scalar + n_cat
            else None
        )
        self.scalar_stats = ScalarStats(n_scalar) if n_scalar else None
        n_labels = len(layout.label_names)
        self.label_head = nn.Linear(config.embed_dim, n_labels) if n_labels else None

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Persona embedding of every row from all its present features: (B, embed_dim)."""
        tokens, present = self.adapter(batch)
        return self.trunk(tokens, _at_least_one(present))

    def forward(self, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``(B,)``: reconstruct the hidden features, predict known labels.

        ``keep`` (B, T) says which present tokens the encoder sees; the others (present but
        hidden) are the reconstruction targets. Each sample's loss depends on that sample
        only, so the batch loss is a mean of per-sample terms, as DP-SGD requires.
        """
        tokens, present = self.adapter(batch)
        keep = _at_least_one(keep & present)
        z = self.trunk(tokens, keep)
        target = present & ~keep
        recon, recon_weight, stats_nll = self._reconstruction(z, batch, target, fit_stats=True)
        loss = recon / recon_weight.clamp(min=1.0) + stats_nll
        labels = batch["labels"]  # (B, n_labels), NaN = unknown
        if self.label_head is not None:
            known = ~torch.isnan(labels)
            # Same value as z; the gradient into the encoder is scaled by label_weight.
            frozen = z.detach()
            logits = self.label_head(frozen + self.config.label_weight * (z - frozen))
            bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels), reduction="none")
            loss = loss + (bce * known).sum(1) / known.sum(1).clamp(min=1)
        return loss

    def _reconstruction(
        self, z: torch.Tensor, batch: dict[str, torch.Tensor], target: torch.Tensor, *, fit_stats: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed per-sample reconstruction loss of hidden scalar and categorical tokens, the
        number of hidden tokens, and (with ``fit_stats``) the scalar statistics' own loss."""
        total = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        count = torch.zeros_like(total)
        stats_nll = torch.zeros_like(total)
        if self.recon_head is None:
            return total, count, stats_nll
        out = self.recon_head(z)  # (B, S + sum(cards))
        n_scalar = len(self.layout.scalar_names)
        if n_scalar and self.scalar_stats is not None:
            nll, inverse_var = self.scalar_stats(batch["scalar"], batch["scalar_present"])
            if fit_stats:
                stats_nll = nll
            pred = torch.sigmoid(out[:, :n_scalar])
            mask = target[:, :n_scalar].to(z.dtype)
            total = total + (((pred - batch["scalar"]) ** 2) * inverse_var * mask).sum(1)
            count = count + mask.sum(1)
        start = n_scalar
        offsets = self.layout.cat_offsets
        for j, card in enumerate(self.layout.cat_cardinalities):
            logits = out[:, start : start + card]
            code = batch["cat"][:, j] - offsets[j]
            mask = target[:, n_scalar + j].to(z.dtype)
            # Divided by the entropy of a uniform guess, so predicting the marginal costs about
            # 1, like a standardised scalar.
            ce = F.cross_entropy(logits, code, reduction="none") / max(1.0, math.log(card))
            total = total + ce * mask
            count = count + mask
            start += card
        return total, count, stats_nll

    def reconstruction_error(self, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """Per-sample mean reconstruction loss of the hidden features (for evaluation)."""
        tokens, present = self.adapter(batch)
        keep = _at_least_one(keep & present)
        z = self.trunk(tokens, keep)
        total, count, _ = self._reconstruction(z, batch, present & ~keep)
        return total / count.clamp(min=1.0)

    def label_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Label-head logits ``(B, n_labels)`` for embeddings ``z``."""
        if self.label_head is None:
            raise ValueError("this schema declares no label, so the model has no label head")
        return self.label_head(z)


def _at_least_one(mask: torch.Tensor) -> torch.Tensor:
    """Make sure every row keeps one token (the first one) so pooling is defined."""
    empty = ~mask.any(1, keepdim=True)
    first = torch.zeros_like(mask)
    first[:, 0] = True
    return mask | (empty & first)


def token_presence(layout: FeatureLayout, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which tokens of each row carry a value: (B, T) bool, in the adapter's token order."""
    parts: list[torch.Tensor] = []
    if layout.scalar_names:
        parts.append(batch["scalar_present"])
    if layout.cat_names:
        parts.append(batch["cat_present"])
    for i in range(len(layout.text_names)):
        parts.append((batch[f"text{i}"] > 0).any(1, keepdim=True))
    for i in range(len(layout.seq_num_names)):
        parts.append(batch[f"seqnum{i}_present"].any(1, keepdim=True))
    for i in range(len(layout.seq_cat_names)):
        parts.append(batch[f"seqcat{i}_present"].any(1, keepdim=True))
    return torch.cat(parts, 1)


def random_keep(present: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Hide each present token with probability ``rate`` (self-supervised masking)."""
    draw = torch.rand(present.shape, generator=generator, device=generator.device)
    return present & (draw.to(present.device) >= rate)
