"""Logs, metrics and (later) traces. Nothing here may block the request path."""
