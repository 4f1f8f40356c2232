"""Output-space merges: build a new Keras graph from whole models."""
