"""Real parts for the test suite: registry processes, token issuer, image builder."""
