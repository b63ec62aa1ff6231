"""Real deployments on Flower"s Deployment Engine: the coordinator (SuperLink, registration,
the run), the partner site (SuperNode), credentials, process supervision and the model
registry."""

__all__ = ["certs", "coordinator", "kit", "lifetime", "partner_site", "processes", "registry", "rehearsal"]
