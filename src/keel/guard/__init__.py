"""Guardrails: checks on what users send and what models answer (see :mod:`keel.guard.base` for the contract,
:mod:`keel.guard.runner` for how findings become a verdict, :mod:`keel.guard.stream` for streams and
:mod:`keel.guard.registry` for how config builds them)."""

from keel.guard.base import Action, Check, Direction, Finding, GuardInput, Span
from keel.guard.runner import ConfiguredCheck, GuardRunner, Verdict

__all__ = ["Action", "Check", "ConfiguredCheck", "Direction", "Finding", "GuardInput", "GuardRunner", "Span", "Verdict"]
