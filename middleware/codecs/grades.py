"""Korean Ministry of Environment PM grades (FIELD.md): good, moderate, bad, very bad."""
from __future__ import annotations

GRADES = ("good", "moderate", "bad", "very bad")
PM10_LIMITS = (30, 80, 150)    # good ≤30, moderate ≤80, bad ≤150, very bad ≥151 µg/m³
PM25_LIMITS = (15, 35, 75)     # good ≤15, moderate ≤35, bad ≤75, very bad ≥76 µg/m³


def _grade(value: float, limits: tuple[int, int, int]) -> int:
    """Index into GRADES; values between two integers (30.4) round half up like the published integers."""
    v = int(value + 0.5) if value >= 0 else 0
    for i, limit in enumerate(limits):
        if v <= limit:
            return i
    return 3


def pm_grade(pm10: float | None = None, pm25: float | None = None) -> str | None:
    """The worse of the PM10 and PM2.5 grades; None when neither is known."""
    grades = [_grade(v, lim) for v, lim in ((pm10, PM10_LIMITS), (pm25, PM25_LIMITS)) if v is not None]
    return GRADES[max(grades)] if grades else None
