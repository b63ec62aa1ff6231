"""Every setting fedpersona reads, declared once: scenarios, a partner's client.toml, the
coordinator's federation.toml and a partner's fixed plan (plan.json). Each block is a frozen,
strictly typed pydantic model (:mod:`fedpersona.config.settings`); the files are read and
validated whole, every problem reported at once with a did-you-mean for misspelt keys
(:mod:`fedpersona.config.files`). This layer imports nothing of fedpersona but its errors."""

__all__ = ["files", "problems", "settings"]
