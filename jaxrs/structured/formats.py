"""RFC 3339 dates and times as patterns, for the `date`, `time` and `date-time` formats.

llguidance's own `date` takes February 29 of any year (a sampler wrote `4795-02-29`), which
`jsonschema`, pydantic and `datetime` refuse. These patterns hold the calendar: each month's length,
leap years (divisible by 4, not by 100 unless by 400), years 0001-9999 (`datetime` has no year 0),
hours 00-23, seconds up to a leap 60, offsets `Z` or +-hh:mm, upper-case `T` and `Z` (the form every
reader takes).
"""

from __future__ import annotations

_YEAR = "([1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP_YEAR = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (
    "((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))"
)
DATE = f"({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
TIME = "([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
PATTERNS = {"date": f"^{DATE}$", "time": f"^{TIME}$", "date-time": f"^{DATE}T{TIME}$"}


def calendar_formats(schema: dict) -> dict:
    """`schema` with a `date`, `time` or `date-time` format as its pattern (one it states itself
    keeps the format: a schema has one `pattern`)."""
    pattern = PATTERNS.get(schema.get("format"))
    if pattern is None or "pattern" in schema:
        return schema
    return {k: v for k, v in schema.items() if k != "format"} | {"pattern": pattern}
