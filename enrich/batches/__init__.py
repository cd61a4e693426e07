"""Bulk batches: input parsing, storage caps, result rows, and the store that runs them."""
