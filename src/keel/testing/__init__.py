"""Test helpers that ship with Keel: :mod:`keel.testing.fake_upstream`, a scripted fake LLM upstream."""
