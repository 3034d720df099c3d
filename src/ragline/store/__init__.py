"""Store stage: chunks, their vectors and the ingest manifest, kept consistent together."""
