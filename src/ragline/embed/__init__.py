"""Embed stage: turn chunk and query text into normalized vectors."""
