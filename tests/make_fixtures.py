"""Regenerates tests/fixtures/torchvision_state_dicts.json from the installed torchvision.

    python tests/make_fixtures.py
The fixture is committed: it pins the key names and shapes the fused models must keep.
"""

import json
import re
from pathlib import Path

import torchvision

from fused_resnet.models import TORCHVISION_BUILDERS

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision_state_dicts.json"


def main() -> None:
    golden = {}
    for name in TORCHVISION_BUILDERS:
        state = getattr(torchvision.models, name)().state_dict()
        golden[name] = {key: list(t.shape) for key, t in state.items()}
    golden["_torchvision_version"] = torchvision.__version__
    text = json.dumps(golden, indent=1)
    # One line per key: collapse the shape lists.
    text = re.sub(r"\[([\d,\s]*)\]", lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text)
    FIXTURE.write_text(text + "\n")


if __name__ == "__main__":
    main()
