#!/usr/bin/env python
"""Thin script for `downscale data CONFIG [key.path=value ...]` (same code, same flags)."""

import sys

from downscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
