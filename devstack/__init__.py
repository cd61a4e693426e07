"""The stand-in upstream (sandbox) and the local runner (`make run`); the service never imports it."""
