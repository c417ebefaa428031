#!/usr/bin/env python
"""Thin script for `downscale specialize CONFIG [key.path=value ...]` (same code, same flags)."""

import sys

from downscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["specialize", *sys.argv[1:]]))
