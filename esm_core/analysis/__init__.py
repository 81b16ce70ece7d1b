"""Read-only views of a run: adapter descriptions, sample previews, one coefficient explained, 2-D maps."""
