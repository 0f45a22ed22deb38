"""Parameter counts of DINO-4scale R50 and Swin-L here and in official DINO.

The official counts come from the key lists in reference/ (every state_dict entry of the
official models with its shape): learned parameters are the entries that are neither buffers
(frozen batch-norm statistics and affine terms, Swin's relative_position_index) nor aliases of the
shared decoder heads. Usage: python scripts/param_count.py [path/to/reference]
"""
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import build_dino  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "reference"
KEY_LISTS = {"r50": "official_r50_keys.json", "swinl": "official_swinl_keys.json"}


def official_parameter_count(keys: dict[str, list[int]]) -> int:
    frozen_bn = re.compile(r"^backbone\.0\.body\..*(bn\d|downsample\.1)\.")
    alias = re.compile(r"^(transformer\.decoder\.(class|bbox)_embed\.\d+|(class|bbox)_embed\.[1-9]\d*)\.")
    return sum(math.prod(shape) for name, shape in keys.items()
               if not frozen_bn.match(name) and not alias.match(name)
               and not name.endswith("relative_position_index"))


def main():
    reference = Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCE
    ok = True
    for backbone, filename in KEY_LISTS.items():
        ours = sum(p.numel() for p in build_dino(backbone).parameters())
        official = official_parameter_count(json.loads((reference / filename).read_text()))
        ok &= ours == official
        print(f"DINO-4scale {backbone:5s}: ours {ours:,} parameters, official {official:,} "
              f"({'match' if ours == official else 'MISMATCH'})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
