"""Ingest stage: find source files, load them into sections, and cut sections into chunks."""
