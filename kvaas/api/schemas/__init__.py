"""Request and response bodies of the HTTP API, one module per domain.

The class names are the OpenAPI schema names (``api_spec/openapi.json``): renaming one changes
the published document. Routers import their bodies from here, never from another router.
"""
