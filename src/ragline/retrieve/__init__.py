"""Retrieve stage: find the chunks that answer a query."""
