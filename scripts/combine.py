#!/usr/bin/env python
"""Thin script for `downscale combine CONFIG [key.path=value ...]` (same code, same flags)."""

import sys

from downscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["combine", *sys.argv[1:]]))
