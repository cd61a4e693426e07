"""The web routes and request hooks other than the API core in app.py: pages, admin, batches, OpenAPI."""
