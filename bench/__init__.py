"""`python -m ctun.bench`: throughput, packet rate, latency and CPU of ctun against a plain route.

One run builds its own namespace lab (ctun.lab.topology.Lab), measures the plain routed path
first and then ctun per transport over the same path, so every ctun figure has a baseline
taken minutes earlier on the same machine. bench/RESULTS.md says how runs are recorded.
"""
