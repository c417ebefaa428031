"""Write docs/CONFIG.md, the config reference, from the schema:  python scripts/config_reference.py"""

from pathlib import Path

from downscale._io import write_text_atomic
from downscale.config import config_reference_markdown

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
    write_text_atomic(out, config_reference_markdown())
    print(f"wrote {out}")
