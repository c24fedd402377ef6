"""The policy file and the environment, read once into frozen settings
(:mod:`~worker.settings.load`, :mod:`~worker.settings.model`, :mod:`~worker.settings.env`).
"""
