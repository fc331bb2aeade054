"""Upper bounds of the integers requests carry.

Every integer a request may hold has a maximum in its schema, so no value reaches the
database or the engine that they cannot hold: PostgreSQL's ``integer`` and ``bigint`` and
SQLite's 64-bit integers refuse larger ones with an error, which would be a 5xx. The bounds
are those of the columns (or, for token ids, of any vocabulary); the settings narrow some of
them further with their own message (e.g. ``KVAAS_MAX_TTL_SECONDS``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: Largest value of a 32-bit column (versions, TTLs, cache counts).
INT32_MAX = 2**31 - 1
#: Largest value of a 64-bit column (quotas, amounts).
INT64_MAX = 2**63 - 1

#: A token id of the served model (vocabularies are far below 2**31).
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
