"""fedpersona: federated, differentially private user personas."""

__version__ = "0.1.0"
