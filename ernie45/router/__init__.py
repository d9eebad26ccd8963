"""`ernie45 router`: an OpenAI-compatible front over prefill, decode and mixed `ernie45 serve` instances.

The level above each engine's own scheduler (the "multi-level" balancing): `instances` (registration, health and
load scraping), `policies` (round_robin, least_load, cache_aware), `proxy` (the two-phase prefill -> KV transfer ->
decode flow, retries), `role_switch` (dynamic roles: the rule and the drain-then-switch procedure), `metrics`,
`app` (the FastAPI app).
"""
