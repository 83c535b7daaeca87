"""Text fields a database can store: the type every user-text field of a request uses.

PostgreSQL's ``text`` cannot hold NUL (U+0000); a value with one would fail at the INSERT, as a
500, with the value in the driver's error. ``StorableText`` refuses it at the API boundary (a 422
that names the field, never the value). Lone surrogates, the other thing no UTF-8 column
stores, are already refused by pydantic's ``str`` for JSON input; they are checked here too so
that the rule holds whatever the input path.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def ensure_storable(value: str) -> str:
    """``value`` unchanged, or ``ValueError`` if it holds NUL or a lone surrogate."""
    if _UNSTORABLE.search(value):
        raise ValueError("must not contain NUL (U+0000) or unpaired surrogate characters")
    return value


StorableText = Annotated[str, AfterValidator(ensure_storable)]
