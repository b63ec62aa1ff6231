"""Secret randomness for every mechanism whose output leaves a partner.

**Threat model.** The coordinator is the adversary a partner's guarantee is for. It knows
everything it sends or can learn: the federation seed, every partner's name, the round
numbers, the settings, the public counts, the model it sent. Randomness derived from any of
that (``seed(federation_seed, name, round)``) is randomness the coordinator can regenerate: it
subtracts the Gaussian noise from a release and is left with the exact statistic. So the
randomness behind a release (DP-SGD noise, the Poisson draw of each batch, the DP k-means
noise, the noisy row count) comes from :class:`SecretRandomness`, whose 256-bit key is drawn
from the operating system's CSPRNG (``os.urandom``) for each mechanism run, held in memory
only, never written and never sent. A retried round draws a new key, so it releases fresh
noise.

**The stream.** The key drives a ChaCha20 keystream (RFC 8439, through ``cryptography``):
uniforms take 53 bits of it, Gaussians come from the Box-Muller transform of two uniforms.
Following Holohan & Braghin (2021, arXiv:2107.10138, section 5.1), as Opacus' ``secure_mode``
does, each Gaussian coordinate is the sum of four draws divided by two, which makes the
floating-point attack on a single draw (Mironov 2012; Jin et al. 2022) as hard as guessing
several independent 53-bit mantissas. A call for ``n`` coordinates reads ``32 n`` bytes of
the stream at once and transforms them as whole arrays (torch's vectorised ``log``, ``sqrt``,
``cos``, ``sin`` in float64, on the target device): about 1.5 ms for the encoder's 36k
parameters on one CPU thread, so the secret noise costs a small part of a DP-SGD step.
Poisson sampling (each row independently with probability q) draws the gaps between sampled
rows from the geometric distribution, so a step costs about ``q * n`` uniforms rather than
``n``.

**Reproducible runs, explicitly.** ``[privacy] noise_seed`` in a partner's client.toml (or
``fedpersona simulate --reproducible-noise``) derives every key from that seed and a label
instead (SHA-256). Such a run is labelled "noise seeds known: not private against the
coordinator" in its query reply, privacy.json, the console and the report: whoever knows the
seed can remove the noise. It exists for tests and reproducible simulations only.

Randomness that no release depends on for its privacy (the self-supervised masking of
features, the initialisation of local heads) may come from an ordinary seeded generator; it
is drawn here too (:meth:`SecretRandomness.torch_generator`) so that nothing about a round is
predictable from the messages.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

if TYPE_CHECKING:
    import torch

__all__ = ["KNOWN_SEEDS_LABEL", "SecretRandomness"]

KNOWN_SEEDS_LABEL = "noise seeds known: not private against the coordinator"

_MANTISSA = 2.0**-53
_REUSED_BYTES = 16 * 2**20


class SecretRandomness:
    """A ChaCha20 keystream under a 256-bit key, as uniforms, Gaussians and Poisson samples.

    ``SecretRandomness()`` draws its key from ``os.urandom``; :meth:`from_seed` derives it from
    a seed the partner chose (reproducible, and then NOT private against whoever knows the
    seed). The key never leaves the object.
    """

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(32) if key is None else key
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError("a SecretRandomness key is 32 bytes")
        self.seeded = False
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._zeros, self._out = b"", bytearray()  # keystream buffers, see _top53

    @classmethod
    def from_seed(cls, seed: int, *labels: object) -> SecretRandomness:
        """A reproducible stream for ``seed`` and ``labels`` (see the module docstring)."""
        text = "/".join(["fedpersona-noise", str(int(seed)), *(str(x) for x in labels)])
        out = cls(hashlib.sha256(text.encode()).digest())
        out.seeded = True
        return out

    @classmethod
    def for_mechanism(cls, noise_seed: int | None, *labels: object) -> SecretRandomness:
        """Fresh secret randomness, or the reproducible stream of ``noise_seed`` and ``labels``."""
        return cls() if noise_seed is None else cls.from_seed(noise_seed, *labels)

    def bytes(self, n: int) -> bytes:
        """The next ``n`` bytes of the keystream."""
        return self._stream.update(bytes(n))

    def _top53(self, words: int) -> np.ndarray:
        """The top 53 bits of each of the next ``words`` little-endian 64-bit words of the
        stream, as int64 (int64 converts to float64 faster than uint64; the values are below
        2^53, so the conversion is exact). Up to ``_REUSED_BYTES`` the keystream is written into
        buffers kept between calls (fresh pages cost more than the cipher); the result is a new
        array either way."""
        n = 8 * int(words)
        if n > _REUSED_BYTES:
            stream: bytes | bytearray = self.bytes(n)
        else:
            if len(self._zeros) < n:
                self._zeros, self._out = bytes(n), bytearray(n + 15)  # + block size - 1, as update_into needs
            self._stream.update_into(memoryview(self._zeros)[:n], self._out)
            stream = self._out
        return (np.frombuffer(stream, dtype="<u8", count=int(words)) >> np.uint64(11)).view(np.int64)

    def uniform(self, size: int) -> np.ndarray:
        """``size`` uniforms in (0, 1), float64 with 53 random bits each."""
        return (self._top53(int(size)).astype(np.float64) + 0.5) * _MANTISSA

    def normal(self, shape: tuple[int, ...] | int, std: float = 1.0) -> np.ndarray:
        """Gaussian noise N(0, std^2) of ``shape`` (float64): the sum of four independent
        standard Gaussians divided by two, against floating-point attacks (see the module
        docstring). Each Box-Muller pair ``(u1, u2)`` gives two independent Gaussians,
        ``r cos(2 pi u2)`` and ``r sin(2 pi u2)`` with ``r = sqrt(-2 log u1)``; both are used, so
        four Gaussians cost four uniforms (two pairs) per coordinate."""
        size = int(np.prod(shape))
        return self._normal(size, std, "cpu").numpy().reshape(shape)

    def normal_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """Gaussian noise with the shape, dtype and device of ``reference`` (as :meth:`normal`;
        the same key gives the same values on every device up to the last bit of float64)."""
        noise = self._normal(reference.numel(), std, reference.device)
        return noise.to(dtype=reference.dtype).reshape(reference.shape)

    def _normal(self, size: int, std: float, device: torch.device | str) -> torch.Tensor:
        """``size`` coordinates from ``4 size`` uniforms read in one call: rows 0-1 of the
        ``(4, size)`` block are the two pairs' ``u1``, rows 2-3 their ``u2`` (float64)."""
        import torch

        words = torch.from_numpy(self._top53(4 * size)).to(device)
        u = words.to(torch.float64).add_(0.5).mul_(_MANTISSA).view(4, size)
        radius = torch.log(u[:2]).mul_(-2.0).sqrt_()  # (2, size)
        angle = u[2:].mul(2.0 * math.pi)
        gaussians = torch.cos(angle).mul_(radius).add_(torch.sin(angle).mul_(radius))  # two pairs, (2, size)
        return gaussians.sum(0).mul_(0.5 * float(std))

    def poisson_sample(self, n: int, q: float) -> np.ndarray:
        """Sorted indices of ``range(n)``, each included independently with probability ``q``.

        The gap before the next sampled row is geometric: ``floor(log(u) / log(1 - q))``.
        """
        if not 0 < q <= 1:
            raise ValueError(f"the sampling rate must be in (0, 1], got {q!r}")
        if q >= 1.0:
            return np.arange(n, dtype=np.int64)
        log_keep = math.log1p(-q)
        chosen: list[np.ndarray] = []
        position = -1
        while position < n:
            draws = int(n * q + 6.0 * math.sqrt(n * q + 1.0) + 16)
            gaps = np.floor(np.log(self.uniform(draws)) / log_keep)
            steps = np.minimum(gaps, float(n)).astype(np.int64) + 1
            positions = position + np.cumsum(steps)
            chosen.append(positions[positions < n])
            position = int(positions[-1])
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    def seed64(self) -> int:
        """A 63-bit integer from the stream (to seed a generator for non-release randomness)."""
        return int.from_bytes(self.bytes(8), "little") & (2**63 - 1)

    def torch_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A torch generator seeded from the stream, for randomness no release's privacy
        rests on (feature masking); never for noise or sampling."""
        import torch

        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed64())
        return generator

    def numpy_generator(self) -> np.random.Generator:
        """A numpy generator seeded from 128 bits of the stream (same use as
        :meth:`torch_generator`)."""
        return np.random.default_rng(int.from_bytes(self.bytes(16), "little"))
