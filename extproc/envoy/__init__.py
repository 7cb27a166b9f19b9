"""Envoy's side of Token Meter: the configuration generated from the policy (standalone and Istio)."""
