"""The models DP-SGD trains and how they learn and run: the label model (cross-fitted logistic
regressions on the public label view), the persona encoder, their parameter scopes, local
DP-SGD training, held-out evaluation, inference (loading a model, assigning personas), and
the signed model artifact. Beside it, at each partner and never sent anywhere: what the
partner gets alone from its own rows (own label models, own personas), and its local model
on top of the federated score, with the "cannot learn" detector that guards what it serves."""

__all__ = ["alone", "artifacts", "encoder", "evaluation", "inference", "linear", "scopes", "stacking", "training"]
