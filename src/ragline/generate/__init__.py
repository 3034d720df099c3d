"""Answers: grounded generation with citations, from an LLM or extracted from the hits.

Backends (OpenAI-compatible servers, a local llama.cpp model) are imported only
when chosen, so the default install never pulls in an optional dependency.
"""
