"""Size profiles of the embedded world."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WorldProfile:
    """How big a world to build.

    Countries are taken by population, most populous first; cities are the most
    populous non-capital cities of those countries above ``min_city_population``.
    """

    name: str
    n_countries: int
    n_cities: int
    n_people: int
    min_city_population: int
    queries_per_bucket: int
    #: Weight of each frequency bucket 0..5 when a fact's mention count is drawn.
    bucket_weights: tuple[float, float, float, float, float, float]
    #: Filler (no-fact) sentences per fact mention in the open-set corpus.
    filler_ratio: float
    #: Share of facts without any closed-set ("T-REx") sentence.
    no_gold_fraction: float
    n_sentence_shards: int

    def to_dict(self) -> dict:
        return asdict(self)


# Mention counts per bucket: 0 for bucket 0, else [2^(b-1), 2^b - 1] (see generate.py).
PROFILES: dict[str, WorldProfile] = {
    p.name: p
    for p in (
        WorldProfile("micro", 8, 8, 10, 200_000, 2, (0.15, 0.2, 0.2, 0.2, 0.15, 0.1), 0.5, 0.1, 2),
        WorldProfile("tiny", 40, 50, 80, 300_000, 20, (0.15, 0.25, 0.2, 0.17, 0.13, 0.10), 0.5, 0.1, 4),
        WorldProfile("small", 120, 300, 1000, 100_000, 100, (0.15, 0.25, 0.2, 0.17, 0.13, 0.10), 0.75, 0.1, 8),
        WorldProfile("full", 250, 2000, 10_000, 15_000, 900, (0.15, 0.25, 0.2, 0.17, 0.13, 0.10), 1.0, 0.1, 16),
    )
}


def get_profile(name: str) -> WorldProfile:
    if name not in PROFILES:
        raise ValueError(
            f"Unknown world profile {name!r}. Choose one of: {', '.join(PROFILES)}."
        )
    return PROFILES[name]
