"""Token Meter: an Envoy external processor that governs, meters and routes LLM inference traffic."""
