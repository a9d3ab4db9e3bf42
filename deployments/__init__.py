"""Model and processing deployments of imgserve: plain classes usable without Ray.

Nothing here imports `serve_app`; nothing here knows about HTTP, jobs or the ingress.
"""
