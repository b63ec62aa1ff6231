"""Tables in, arrays out: the schema a partner declares, reading and validating its table,
drafting a schema from a file, aggregating event logs to one row per user, the public
featurizations (dense views for the persona and label models, and the older token tensors), and
the built-in synthetic silos. Nothing here knows about privacy budgets, models or the federation;
everything above reads its data through it."""

__all__ = ["cells", "dense", "drafting", "events", "features", "schema", "schema_reader", "synthetic", "tables"]
