"""What `tokenmeter policy check` tells about the pools: where each model goes, and where the shares
promise more than a pool has (pure functions of a loaded policy)."""

from __future__ import annotations

from extproc.policy.model import Policy


def routes(policy: Policy) -> list[str]:
    """One line per model: the pools it may go to, in the order they are tried."""
    named = set(policy.models).union(*(p.models for p in policy.pools if p.models is not None))
    models = sorted(named)
    other = None
    if not policy.models:  # unlisted models are served too: by the pools that name no models
        other = "(any other model)" if named else "(any model)"
        models.append(other)
    out = []
    for model in models:
        pools = [p for p in policy.pools if p.models is None or (model != other and model in p.models)]
        chain = " -> ".join(
            f"{p.name} ({p.tokens_per_minute} tokens/min)" if p.tokens_per_minute is not None
            else f"{p.name} (no ceiling)"
            for p in pools
        )
        out.append(f"{model}: {chain or 'no pool'}")
    return out


def capacity_warnings(policy: Policy) -> list[str]:
    """Oversubscribed pools (guarantees that sum above the ceiling) and models that no pool serves."""
    warnings: list[str] = []
    for pool in policy.pools:
        if pool.tokens_per_minute is None or not pool.shares:
            continue
        promised = sum(s.guaranteed for s in pool.shares.values())
        if promised > pool.tokens_per_minute:
            owners = ", ".join(f"{o} {s.guaranteed}" for o, s in sorted(pool.shares.items()) if s.guaranteed)
            warnings.append(
                f"pool '{pool.name}' is oversubscribed: its guarantees sum to {promised} tokens per minute "
                f"({owners}), above its ceiling of {pool.tokens_per_minute}; an owner may find its guarantee "
                "taken by the others'"
            )
    for model in sorted(policy.models):
        if not any(p.serves(model) for p in policy.pools):
            warnings.append(f"model '{model}' is served by no pool: its requests get 404 model_not_found")
    return warnings
