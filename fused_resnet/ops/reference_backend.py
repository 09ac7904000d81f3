"""The reference implementation as a Backend entry (always available, supports every configuration)."""

from __future__ import annotations

from ..backends import Backend
from . import reference


def backend(name: str = "reference") -> Backend:
    return Backend(
        name="reference",
        conv_bias_act=reference.conv_bias_act,
        unavailable=lambda: None,
        unsupported=lambda *args: None,
    )
