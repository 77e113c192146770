"""What every config section is made of: the number types its fields use,
the error a bad value raises, and the section base (unknown keys refused)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

PosInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
Prob = Annotated[float, Meta(ge=0.0, le=1.0)]
PosFloat = Annotated[float, Meta(gt=0.0)]
NonNegFloat = Annotated[float, Meta(ge=0.0)]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass
