"""Every setting fedpersona reads, declared once: scenarios, a partner"s client.toml, the
coordinator"s federation.toml and a partner"s fixed plan (plan.json), validated whole with every
problem reported at once."""

__all__ = ["legacy"]
