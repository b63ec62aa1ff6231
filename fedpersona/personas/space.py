"""The persona space of one silo kind: a DP principal-component projection of the public
persona view, fitted by the coordinator from one noisy Gram matrix per partner.

**The release.** A partner clips each training row ``x_i`` of its persona view
(:mod:`fedpersona.data.dense`) to L2 norm ``C`` (``clip``), appends the public constant
``gamma`` (``offset``) and releases the upper triangle (diagonal included) of

    G = sum_i a_i a_i^T + E,    a_i = [clip(x_i), gamma],

where every entry of ``E`` is an independent ``N(0, (s * (C^2 + gamma^2))^2)``.

**Sensitivity.** Adding or removing one user changes ``G`` by ``a a^T``, whose upper triangle
has L2 norm at most ``||a a^T||_F = ||a||^2 <= C^2 + gamma^2``. So the release is a Gaussian
mechanism with noise multiplier ``s`` (std / sensitivity), one un-subsampled step: ledger
entry ``(s, 1.0, 1)``. Every row's contribution is a fixed function of that row; nothing in
``a`` depends on other rows or on the partner's row count.

**The server (post-processing).** Summing the partners' releases gives the Gram matrix of all
their rows, from which the server reads the (noisy) row count ``n = G[d, d] / gamma^2``, the
mean ``mu = G[:d, d] / (gamma n)`` and the covariance ``G[:d, :d] / n - mu mu^T``; the
projection ``V`` is the covariance's top ``dims`` eigenvectors and ``lambda`` their
eigenvalues. Nothing else is released and no declared row count is needed, so a partner's
exact count never enters the model except through the noisy release.

**An embedding.** ``z = clip(V^T (clip(x) - mu), c_z)`` with ``c_z = clip_mult *
sqrt(sum(lambda))``: the clip bounds what one user adds to the mixture's statistics
(:mod:`fedpersona.personas.mixture`). It is a fixed public function of one row once the
space is released, so embedding the partner's users is free.

*Could an auditor call this a leak?* Only the noisy Gram leaves the partner, charged to its
ledger before it is computed; the noise comes from the partner's secret stream
(:class:`~fedpersona.privacy.randomness.SecretRandomness`), never from anything the
coordinator knows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedpersona.privacy.randomness import SecretRandomness

__all__ = [
    "GRAM_MECHANISM",
    "PersonaSpace",
    "clip_rows",
    "fit_space",
    "gram_release",
    "gram_sensitivity",
    "packed_size",
    "unpack_gram",
]

GRAM_MECHANISM = "dp-gram"
_MIN_EIGENVALUE = 1e-6  # a projected direction never gets zero (or negative) variance


def clip_rows(x: np.ndarray, bound: float) -> np.ndarray:
    """Each row scaled down to L2 norm ``bound`` if it is longer (float64)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a (rows, columns) matrix, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def gram_sensitivity(*, clip: float, offset: float) -> float:
    """L2 sensitivity of the Gram release to adding or removing one user: ``C^2 + gamma^2``."""
    return float(clip) ** 2 + float(offset) ** 2


def packed_size(dim: int) -> int:
    """Length of the packed upper triangle of a ``(dim + 1)``-square Gram matrix."""
    return (dim + 1) * (dim + 2) // 2


def gram_release(
    x: np.ndarray, *, clip: float, offset: float, noise_multiplier: float, randomness: SecretRandomness | None
) -> np.ndarray:
    """The partner's noisy Gram matrix of ``[clip(x), offset]``, as its packed upper triangle.

    ``noise_multiplier = 0`` (an explicitly non-private partner) adds no noise and needs no
    ``randomness``.
    """
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    a = clip_rows(x, clip)
    a = np.hstack([a, np.full((a.shape[0], 1), float(offset))])
    gram = a.T @ a
    packed = gram[np.triu_indices(gram.shape[0])]
    if noise_multiplier > 0:
        if randomness is None:
            raise ValueError("a noisy release needs the partner's secret randomness")
        std = noise_multiplier * gram_sensitivity(clip=clip, offset=offset)
        packed = packed + randomness.normal(packed.shape, std)
    return packed


def unpack_gram(packed: np.ndarray, dim: int) -> np.ndarray:
    """The symmetric ``(dim + 1)``-square matrix of a packed upper triangle."""
    packed = np.asarray(packed, dtype=np.float64)
    if packed.shape != (packed_size(dim),):
        raise ValueError(f"a packed Gram matrix of dimension {dim} has {packed_size(dim)} values, got {packed.shape}")
    gram = np.zeros((dim + 1, dim + 1))
    rows, cols = np.triu_indices(dim + 1)
    gram[rows, cols] = packed
    gram[cols, rows] = packed
    return gram


@dataclass(frozen=True, eq=False)  # arrays: compare by identity
class PersonaSpace:
    """A released projection: ``z = clip(V^T (clip(x, row_clip) - mean), z_clip)``.

    ``mean`` (d,), ``basis`` (d, p) with orthonormal columns, ``spectrum`` (p,) the variance of
    each projected direction (descending), ``rows`` the noisy count of rows it was fitted on.
    """

    mean: np.ndarray
    basis: np.ndarray
    spectrum: np.ndarray
    row_clip: float
    z_clip: float
    rows: float

    def __post_init__(self) -> None:
        d, p = self.basis.shape
        if self.mean.shape != (d,) or self.spectrum.shape != (p,):
            raise ValueError(f"mean {self.mean.shape} and spectrum {self.spectrum.shape} do not fit basis {(d, p)}")
        if not (np.isfinite(self.basis).all() and np.isfinite(self.mean).all() and (self.spectrum > 0).all()):
            raise ValueError("a persona space needs finite values and positive variances")

    @property
    def dim(self) -> int:
        """Width of the persona view it projects."""
        return int(self.basis.shape[0])

    @property
    def dims(self) -> int:
        """Width of the embedding."""
        return int(self.basis.shape[1])

    def embed(self, x: np.ndarray) -> np.ndarray:
        """The embedding of every row of a persona view: (n, p) float64."""
        x = clip_rows(x, self.row_clip)
        if x.shape[1] != self.dim:
            raise ValueError(f"the persona view has {x.shape[1]} columns, the space expects {self.dim}")
        return clip_rows((x - self.mean) @ self.basis, self.z_clip)

    def arrays(self) -> dict[str, np.ndarray]:
        """The space as named arrays (for the model artifact and checkpoints)."""
        return {
            "mean": self.mean.astype(np.float64),
            "basis": self.basis.astype(np.float64),
            "spectrum": self.spectrum.astype(np.float64),
            "clips": np.array([self.row_clip, self.z_clip, self.rows], dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PersonaSpace:
        """The inverse of :meth:`arrays` (ValueError on a wrong name or shape)."""
        missing = {"mean", "basis", "spectrum", "clips"} - set(arrays)
        if missing:
            raise ValueError(f"a persona space needs arrays {sorted(missing)}")
        clips = np.asarray(arrays["clips"], dtype=np.float64)
        if clips.shape != (3,):
            raise ValueError(f"persona space clips must hold 3 values, got shape {clips.shape}")
        return cls(
            mean=np.asarray(arrays["mean"], dtype=np.float64),
            basis=np.asarray(arrays["basis"], dtype=np.float64),
            spectrum=np.asarray(arrays["spectrum"], dtype=np.float64),
            row_clip=float(clips[0]),
            z_clip=float(clips[1]),
            rows=float(clips[2]),
        )


def fit_space(
    packed_sum: np.ndarray, *, dim: int, dims: int, row_clip: float, offset: float, z_clip_mult: float = 1.2
) -> PersonaSpace:
    """The projection from the sum of partners' packed Gram releases (server side).

    The row count is read from the offset column (``G[d, d] = gamma^2 n`` plus noise), so no
    declared count is needed; a noisy count below one row is refused as "no data".
    """
    if not 1 <= dims <= dim:
        raise ValueError(f"the embedding needs 1 <= dims <= {dim} (the persona view's width), got {dims}")
    gram = unpack_gram(packed_sum, dim)
    rows = gram[dim, dim] / offset**2
    if not math.isfinite(rows) or rows < 1.0:
        raise ValueError(f"the summed Gram releases hold {rows:.3g} rows: too few (or too noisy) to fit a space")
    mean = gram[:dim, dim] / (offset * rows)
    cov = gram[:dim, :dim] / rows - np.outer(mean, mean)
    values, vectors = np.linalg.eigh((cov + cov.T) / 2.0)
    order = np.argsort(values)[::-1][:dims]
    spectrum = np.maximum(values[order], _MIN_EIGENVALUE)
    basis = vectors[:, order]
    # A fixed sign per direction (largest |entry| positive), so equal inputs give equal spaces.
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(dims)])
    basis = basis * np.where(signs == 0, 1.0, signs)
    return PersonaSpace(
        mean=mean,
        basis=basis,
        spectrum=spectrum,
        row_clip=float(row_clip),
        z_clip=float(z_clip_mult * math.sqrt(spectrum.sum())),
        rows=float(rows),
    )
