"""downscale: compress a big language model into small students, specialize each on a domain,
combine them, and measure the ensemble honestly against the uncompressed base."""

__version__ = "0.1.0"

__all__ = ["EnsembleModel", "load_ensemble", "load_config", "__version__"]


def __getattr__(name: str):
    """Lazy top-level API (importing ``downscale`` stays fast: torch loads on first use)."""
    if name in ("EnsembleModel", "load_ensemble"):
        from downscale import ensemble

        return getattr(ensemble, name)
    if name == "load_config":
        from downscale.config import load_config

        return load_config
    raise AttributeError(f"module 'downscale' has no attribute {name!r}")
