"""Evidence: one usage record per request, durable and exportable."""
