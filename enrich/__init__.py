"""The lookup service: engine, stores, sources, batches, web routes and command line.

The design card's entry points stay at the repository's top (app.py, job_queue.py,
cache_manager.py, circuit_breaker_manager.py, sse_streaming.py); docs/architecture.md draws the parts.
"""
