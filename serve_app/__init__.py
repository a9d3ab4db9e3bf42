"""imgserve's application layer: config, graph builder, ingress (HTTP and handle), client, CLI."""
