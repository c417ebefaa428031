"""downscale: compress a big language model into small students, specialize each on a domain,
combine them, and measure the ensemble honestly against the uncompressed base."""

__version__ = "0.1.0"
