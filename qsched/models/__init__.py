"""Models: the registry and its loaders, one adapter per family, shipped configs, tiny pipelines, prompt pools
and the per-model profile (generation settings, scorer source, prompt sets by purpose)."""
