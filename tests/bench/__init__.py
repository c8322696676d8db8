"""`make bench`: load benchmark of the gateway against its baselines (not part of the tests)."""
