"""Application services: the operations the API exposes, independent of HTTP."""
