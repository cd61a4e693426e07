"""Bulk batches: input parsing, storage caps, result rows, the store that keeps them, the runner that moves them."""
