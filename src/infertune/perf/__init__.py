"""Speed: latency harness (and, later, sweeps and per-op profiles)."""
