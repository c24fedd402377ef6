"""Each section of the policy file read by its own parser (:mod:`worker.settings.load` calls
them)."""
