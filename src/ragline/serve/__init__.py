"""Serve stage: the HTTP API."""
