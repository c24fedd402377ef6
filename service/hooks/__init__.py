"""Each sender's deliveries, verified and parsed: the registry, GitHub, GitLab."""
