"""Per-sample clipping in one forward and one backward, without per-sample gradients.

**The models.** Any module whose parameters all sit in :class:`torch.nn.Linear`,
:class:`torch.nn.Embedding` and :class:`torch.nn.LayerNorm` layers (each called at most once
per forward pass, no parameter shared between layers), with anything parameter-free between
them (activations, masking, pooling over a row's tokens, softmax within a row, buffers), and a
loss that is a sum of per-row losses ``L = sum_b l_b`` where ``l_b`` depends on row ``b``
only. Every layer's input and output carry the batch in their first dimension: a linear layer
may see ``(B, p)`` or ``(B, T, p)`` (the same weights on each of a row's ``T`` tokens), an
embedding ``(B,)`` or ``(B, L)`` indices, a layer norm ``(B, ..., d)``. The persona encoder
(:mod:`fedpersona.model.encoder`) is such a model. Other modules holding parameters, batch
norms (they mix the rows of a batch), and embeddings with ``max_norm``, ``scale_grad_by_freq``
or ``sparse`` are refused.

**The math** (the "book-keeping" trick: Lee & Kifer 2021, "Scaling up differentially private
deep learning with fast per-example gradient clipping", PETS; Bu et al. 2023, "Differentially
private optimization on large model at small cost", ICML; the token Gram norms are the
"ghost norm" of Li et al. 2022, "Large language models can be strong differentially private
learners", ICLR). Let layer ``i`` have output ``s_i`` and ``g_i = dL/ds_i``; because ``L`` is
a sum of per-row losses, row ``b`` of ``g_i`` is ``dl_b/ds_{i,b}``, sample ``b``'s own output
gradient. With ``a_{b,t}`` the input of token ``t`` of row ``b`` and ``g_{b,t}`` its output
gradient, sample ``b``'s parameter gradients and their squared norms are

- linear ``s = a W^T + bias``: ``grad_W = sum_t g_{b,t} a_{b,t}^T`` with
  ``||grad_W||^2 = sum_{t,u} (a_{b,t} . a_{b,u}) (g_{b,t} . g_{b,u})`` (a ``T x T`` Gram per
  row; for ``T = 1`` the product ``||g_b||^2 ||a_b||^2``; when ``T (p + k) > p k`` it is
  cheaper to form the ``k x p`` matrix per row and take its norm); ``grad_bias = sum_t g_{b,t}``;
- embedding ``s_{b,t} = E[i_{b,t}]``: ``grad_E`` has row ``j`` equal to ``sum_{t: i_{b,t} = j}
  g_{b,t}``, so ``||grad_E||^2 = sum_{t,u} 1[i_{b,t} = i_{b,u}] (g_{b,t} . g_{b,u})`` (positions
  at ``padding_idx`` get no gradient and are left out; for a table of at most ``T^2`` rows it is
  cheaper to form each sample's ``(rows, d)`` gradient and take its norm);
- layer norm ``s = x_hat * w + beta`` with ``x_hat`` the input normalised per token:
  ``grad_w = sum_t g_{b,t} * x_hat_{b,t}``, ``grad_beta = sum_t g_{b,t}`` (vectors of size d,
  formed per row).

The total ``||grad_b||^2`` is the sum over layers (trainable parameters only). With the clip
factors ``c_b = min(1, C / ||grad_b||)`` (1 for a zero gradient) each clipped sum is the
ordinary weight gradient of the re-weighted output gradients ``c_b g_b``: ``(c g)^T a`` over all
tokens for a linear weight, an index-add of ``c_b g_{b,t}`` into the rows ``i_{b,t}`` for an
embedding, ``sum_b c_b grad_b`` for a layer norm. One forward pass records every input and
output (forward hooks), one backward pass (``torch.autograd.grad`` of ``L`` with respect to
the outputs, which skips the parameter gradients) gives every ``g_i``; there is no second
backward and no per-sample gradient of a large layer. Everything stays on the model's
device, with no Python loop over rows.

**Privacy.** Adding or removing one row changes the clipped sum by that row's clipped
gradient, whose L2 norm over all layers together is at most ``C``: the sum has L2
sensitivity ``C``. :func:`noisy_clipped_sum` adds ``N(0, (sigma C)^2)`` to every coordinate,
with noise from the partner's :class:`~fedpersona.privacy.randomness.SecretRandomness`: one
step of the subsampled Gaussian mechanism, accounted as ``(sigma, q, 1)`` in the ledger when
the batch was drawn by Poisson sampling at rate ``q`` from the same secret source. Could an
auditor call this a leak? Only the noisy sum (and what is computed from it) may leave the
silo, and only after the ledger charged it. :class:`ClippedSum` (the exact clipped sum, the
per-sample norms and losses) is a function of individual rows without noise: it stays in the
partner's memory and is never logged or sent. An empty Poisson batch still releases noise
(on a zero sum), since skipping the step would reveal that the batch was empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from fedpersona.privacy.randomness import SecretRandomness

__all__ = ["ClippedSum", "add_secret_noise", "clip_factors", "clipped_gradient_sum", "noisy_clipped_sum"]

_SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)


@dataclass(frozen=True)
class ClippedSum:
    """The clipped sum of a batch's per-sample gradients. Never leaves the partner (no noise).

    ``grads`` maps each trainable parameter's name (as in ``model.named_parameters()``) to
    ``sum_b c_b grad_b`` (same shape as the parameter); ``norms`` holds the unclipped
    per-sample gradient norms, shape ``(B,)``; ``losses`` the per-sample losses (detached).
    """

    grads: dict[str, torch.Tensor]
    norms: torch.Tensor
    max_grad_norm: float
    losses: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def __post_init__(self) -> None:
        _check_positive("max_grad_norm", self.max_grad_norm)
        if self.norms.dim() != 1:
            raise ValueError(f"norms must have shape (B,), got {tuple(self.norms.shape)}")

    @property
    def batch_size(self) -> int:
        return int(self.norms.shape[0])


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, C / norm)`` per sample, 1 for a zero gradient: each clipped gradient has norm <= C."""
    return max_grad_norm / norms.clamp(min=max_grad_norm)


def clipped_gradient_sum(
    *,
    model: nn.Module,
    per_sample_loss: Callable[[], torch.Tensor],
    max_grad_norm: float,
) -> ClippedSum:
    """Run ``per_sample_loss()`` (which calls ``model`` on a batch of B rows and returns the
    ``(B,)`` per-row losses) and return the batch's clipped gradient sum and per-sample norms.

    No ``.grad`` is touched. See the module docstring for the supported models and the math.
    """
    _check_positive("max_grad_norm", max_grad_norm)
    layers = _layers(model)
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (input, output)
    paths: dict[nn.Module, str] = {module: path for path, module in layers}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module in seen:
            raise ValueError(
                f"layer '{paths[module]}' was called twice in one pass; per-sample clipping supports each "
                "layer once per forward (no weight sharing)"
            )
        a = inputs[0]
        if isinstance(module, nn.Linear | nn.LayerNorm) and a.dim() < 2:
            raise ValueError(
                f"layer '{paths[module]}' got an input of shape {tuple(a.shape)}; per-sample clipping needs "
                "the batch in the first dimension and features in the last, (B, ..., features)"
            )
        seen[module] = (a.detach(), output)

    handles = [module.register_forward_hook(record) for _, module in layers]
    try:
        losses = per_sample_loss()
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"per_sample_loss must return one loss per row, shape (B,), got {shape}")
    batch = int(losses.shape[0])
    for module, (a, _) in seen.items():
        if a.dim() == 0 or a.shape[0] != batch:
            raise ValueError(
                f"layer '{paths[module]}' saw an input of shape {tuple(a.shape)} but per_sample_loss returned "
                f"{batch} losses; per-sample clipping needs the batch in the first dimension"
            )

    used = [module for _, module in layers if module in seen]
    device, dtype = _device_dtype(model)
    squared = torch.zeros(batch, device=device, dtype=dtype)
    passes: dict[nn.Module, _Layer] = {}
    if used and batch > 0:
        if not losses.requires_grad:
            raise ValueError(
                "per_sample_loss returned losses that do not depend on the model's parameters "
                "(computed under torch.no_grad()?)"
            )
        found = torch.autograd.grad(losses.sum(), [seen[m][1] for m in used], allow_unused=True)
        for module, g in zip(used, found, strict=True):
            passes[module] = _layer(module, seen[module][0], torch.zeros_like(seen[module][1]) if g is None else g)
            squared = squared + passes[module].squared
    norms = squared.sqrt()
    factors = clip_factors(norms, max_grad_norm)

    grads: dict[str, torch.Tensor] = {}
    for path, module in layers:
        prefix = f"{path}." if path else ""
        clipped = _clipped_sums(passes[module], factors) if module in passes else {}
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:  # a layer not called, or an empty batch: nothing to add
                value = clipped.get(name)
                grads[prefix + name] = torch.zeros_like(param) if value is None else value.to(param.dtype)
    return ClippedSum(
        grads=grads, norms=norms, max_grad_norm=float(max_grad_norm), losses=losses.detach()
    )  # fmt: skip


def noisy_clipped_sum(
    *,
    model: nn.Module,
    per_sample_loss: Callable[[], torch.Tensor],
    max_grad_norm: float,
    noise_multiplier: float,
    randomness: SecretRandomness,
) -> dict[str, torch.Tensor]:
    """The DP release of one step: the clipped gradient sum plus ``N(0, (noise_multiplier *
    max_grad_norm)^2)`` on every coordinate, the noise drawn from ``randomness``.

    Divide by the *expected* batch size (``q * public_rows``), never the drawn one, for an
    average: the drawn size is not public.
    """
    _check_positive("noise_multiplier", noise_multiplier)
    clipped = clipped_gradient_sum(model=model, per_sample_loss=per_sample_loss, max_grad_norm=max_grad_norm)
    return add_secret_noise(clipped.grads, std=noise_multiplier * max_grad_norm, randomness=randomness)


def add_secret_noise(
    grads: dict[str, torch.Tensor], *, std: float, randomness: SecretRandomness
) -> dict[str, torch.Tensor]:
    """Each tensor plus ``N(0, std^2)`` per coordinate from ``randomness``, drawn for all of them
    at once (one pass over the stream, in the order of ``grads``)."""
    if not grads:
        return {}
    first = next(iter(grads.values()))
    sizes = [g.numel() for g in grads.values()]
    flat = randomness.normal_like(torch.empty(sum(sizes), device=first.device, dtype=first.dtype), std)
    pieces = flat.split(sizes)
    return {name: g + piece.view_as(g).to(g.dtype) for (name, g), piece in zip(grads.items(), pieces, strict=True)}


# --- per layer type: the tokens of a row in one dimension, norms, clipped sums ----------------


@dataclass(frozen=True)
class _Layer:
    """One layer's pass: ``a`` its per-token inputs (linear ``(B, T, p)``; embedding indices
    ``(B, T)``; layer norm ``x_hat`` ``(B, T, n)``), ``g`` its per-token output gradients
    ``(B, T, k)`` (0 at an embedding's padding positions), ``small`` the per-sample gradients
    of the parameters that are cheap to form (biases, layer norms: ``(B, size)``) and
    ``squared`` each sample's squared gradient norm over the layer's trainable parameters."""

    module: nn.Module
    a: torch.Tensor
    g: torch.Tensor
    small: dict[str, torch.Tensor]
    squared: torch.Tensor


def _layer(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> _Layer:
    batch = g.shape[0]
    small: dict[str, torch.Tensor] = {}
    trainable = {name for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    squared = torch.zeros(batch, device=g.device, dtype=g.dtype)
    if isinstance(module, nn.Embedding):
        index = a.reshape(batch, -1)
        g = g.reshape(batch, index.shape[1], -1)
        if module.padding_idx is not None:
            g = g * (index != module.padding_idx).unsqueeze(-1).to(g.dtype)
        tokens = index.shape[1]
        if tokens == 1:
            squared = torch.linalg.vector_norm(g[:, 0], dim=1).square()
        elif module.num_embeddings <= tokens * tokens:  # a small table: each row's gradient, (B, N, d)
            rows = g.new_zeros(batch, module.num_embeddings, g.shape[-1])
            rows.scatter_add_(1, index.unsqueeze(-1).expand(-1, -1, g.shape[-1]), g)
            squared = torch.linalg.vector_norm(rows, dim=(1, 2)).square()
        else:
            same = (index.unsqueeze(2) == index.unsqueeze(1)).to(g.dtype)  # (B, T, T)
            squared = (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        return _Layer(module, index, g, small, squared)
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        size = math.prod(shape)
        x_hat = F.layer_norm(a, shape, None, None, module.eps).reshape(batch, -1, size)
        g = g.reshape(batch, -1, size)
        if "weight" in trainable:
            small["weight"] = (g * x_hat).sum(1)
        if "bias" in trainable:
            small["bias"] = g.sum(1)
        for value in small.values():
            squared = squared + torch.linalg.vector_norm(value, dim=1).square()
        return _Layer(module, x_hat, g, small, squared)
    assert isinstance(module, nn.Linear)
    if a.dim() == 2:  # one token per row: ||g_b||^2 (||a_b||^2 + 1[trainable bias]), kept 2-D
        # vector_norm(...).square(): one fused pass, no temporary of the input's size
        g_squared = torch.linalg.vector_norm(g, dim=1).square()
        a_squared = torch.linalg.vector_norm(a, dim=1).square() if "weight" in trainable else None
        if a_squared is not None and "bias" in trainable:
            squared = g_squared * (a_squared + 1.0)
        else:
            squared = g_squared * a_squared if a_squared is not None else g_squared
        return _Layer(module, a, g, small, squared)
    a, g = a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])
    tokens, p, k = a.shape[1], a.shape[2], g.shape[2]
    if "weight" in trainable:
        if tokens * (p + k) <= p * k:  # the T x T Grams are cheaper than the k x p gradient
            squared = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        else:
            squared = torch.linalg.vector_norm(torch.bmm(g.transpose(1, 2), a), dim=(1, 2)).square()
    if "bias" in trainable:
        small["bias"] = g.sum(1)
        squared = squared + torch.linalg.vector_norm(small["bias"], dim=1).square()
    return _Layer(module, a, g, small, squared)


def _clipped_sums(layer: _Layer, factors: torch.Tensor) -> dict[str, torch.Tensor]:
    """``sum_b c_b grad_b`` for each of the layer's trainable parameters."""
    module, a, g = layer.module, layer.a, layer.g
    out = {name: (factors @ value).reshape(getattr(module, name).shape) for name, value in layer.small.items()}
    weight = module.weight
    if not isinstance(weight, torch.Tensor) or not weight.requires_grad or "weight" in out:
        if isinstance(module, nn.Linear) and g.dim() == 2 and module.bias is not None and module.bias.requires_grad:
            out["bias"] = factors @ g  # a frozen weight: the bias alone
        return out
    if isinstance(module, nn.Embedding):
        rows = (g * factors[:, None, None]).reshape(-1, g.shape[-1]).to(weight.dtype)
        out["weight"] = torch.zeros_like(weight).index_add_(0, a.reshape(-1), rows)
    elif g.dim() == 2:  # a linear layer with one token per row: (c g)^T a and sum_b c_b g_b
        scaled = g * factors[:, None]
        out["weight"] = scaled.t() @ a
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = scaled.sum(0)
    elif a.shape[-1] <= g.shape[-1]:  # scale the narrower side: (c g)^T a = g^T (c a)
        out["weight"] = g.reshape(-1, g.shape[-1]).t() @ (a * factors[:, None, None]).reshape(-1, a.shape[-1])
    else:
        out["weight"] = (g * factors[:, None, None]).reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
    return out


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's supported layers with a trainable parameter; every other module holding
    parameters, and every unsupported option, is refused in one error that lists them all."""
    problems: list[str] = []
    layers: list[tuple[str, nn.Module]] = []
    owner: dict[int, str] = {}
    for path, module in model.named_modules():
        where = path or "the model itself"
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            problems.append(f"'{where}' ({type(module).__name__}) mixes the rows of a batch")
            continue
        if type(module) not in _SUPPORTED:
            if own:
                problems.append(f"'{where}' ({type(module).__name__}) holds parameters")
            continue
        for param in own:
            if id(param) in owner:
                problems.append(f"'{where}' shares a parameter with '{owner[id(param)]}'")
            owner[id(param)] = where
        if isinstance(module, nn.Embedding):
            options = [
                name
                for name, on in (
                    ("max_norm", module.max_norm is not None),
                    ("scale_grad_by_freq", module.scale_grad_by_freq),
                    ("sparse", module.sparse),
                )
                if on
            ]
            if options:
                problems.append(f"'{where}' (Embedding) uses {', '.join(options)}")
        if any(p.requires_grad for p in own):
            layers.append((path, module))
    if problems:
        raise TypeError(
            "per-sample clipping supports models whose only modules with parameters are torch.nn.Linear, "
            "torch.nn.Embedding (without max_norm, scale_grad_by_freq, sparse) and torch.nn.LayerNorm layers: "
            + "; ".join(problems)
        )
    if not layers:
        raise TypeError(
            "per-sample clipping needs a model with at least one trainable Linear, Embedding or LayerNorm layer"
        )
    return layers


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(p for p in model.parameters() if p.requires_grad)
    return param.device, param.dtype


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
