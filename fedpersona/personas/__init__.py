"""Personas per silo kind: a DP principal-component space of the public persona view
(:mod:`~fedpersona.personas.space`, one Gram release per partner), a tied Gaussian mixture in it
fitted by DP-EM (:mod:`~fedpersona.personas.mixture`), the one protocol that schedules them for the
coordinator and every transport-free caller (:mod:`~fedpersona.personas.protocol`), and the
persona cards a partner writes for its own users."""

__all__ = ["cards", "columns", "mixture", "protocol", "space", "surrogate"]
