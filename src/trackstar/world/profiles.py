"""Size profiles of the embedded world."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .relations import NATURAL_STATEMENTS


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


#: World styles: ``templated`` states each fact in its query's own words (the
#: suite's first world, kept so its tables keep their way back); ``natural``
#: states it as T-REx does (see :class:`NaturalKnobs`).
STYLES = ("templated", "natural")


@dataclass
class NaturalKnobs:
    """The natural style's sources of difficulty, each its own knob.

    Defaults are calibrated on the tiny world (seed 0) so that closed-set BM25
    MRR lies in T-REx's range (0.65-0.85; see docs/worlds.md for how each knob
    moves it). Shares are per mention or per sentence; rates are means per fact.
    """

    #: Natural phrasings per relation in use (the first n of each relation's list).
    phrasings: int = 9
    #: Share of entity mentions in a statement written as an alias ("J. Smith", "DEU").
    alias_share: float = 0.15
    #: Share of an abstract's later subject mentions written as a short form
    #: (a surname, "the city").
    short_form_share: float = 0.2
    #: Share of an abstract's later subject mentions written as a pronoun, where
    #: the phrasing opens with the subject ("She grew up in Y"); where it does
    #: not, that share takes the short form instead (the card counts each form).
    pronoun_share: float = 0.25
    #: Distractors per fact that share its subject and relation words ("X's
    #: brother was born in Z"), mean.
    relative_distractors: float = 1.0
    #: Distractors per fact of a person about a namesake (another person of the
    #: same surname), mean.
    namesake_distractors: float = 0.5
    #: Distractors per fact of a person about someone else with the same object, mean.
    same_object_distractors: float = 0.5
    #: Exponent a of the heavy tail of gold sentences per stated fact:
    #: P(n) proportional to n^-a for n = 1..max_gold (0: uniform).
    gold_tail: float = 2.0
    max_gold: int = 16
    #: Share of stating sentences left unannotated, as T-REx's aligner misses
    #: some (0: the ground truth stays exact).
    annotation_noise: float = 0.0
    #: Share of the open set's (pretraining corpus's) statements written in the
    #: query's wording, as web text also states facts in cloze-like words; the
    #: closed set never is.
    open_prompt_share: float = 0.3

    def __post_init__(self) -> None:
        check_knobs(self)

    def to_dict(self) -> dict:
        return asdict(self)


#: Knob -> (low, high), both inclusive.
_KNOB_RANGES = {
    "alias_share": (0.0, 1.0), "short_form_share": (0.0, 1.0), "pronoun_share": (0.0, 1.0),
    "annotation_noise": (0.0, 1.0), "open_prompt_share": (0.0, 1.0),
    "relative_distractors": (0.0, 20.0), "namesake_distractors": (0.0, 20.0), "same_object_distractors": (0.0, 20.0),
    "gold_tail": (0.0, 10.0), "max_gold": (1, 64),
}


def check_knobs(knobs: NaturalKnobs, prefix: str = "world.natural") -> None:
    """Raise ValueError naming the first knob out of range and its allowed values."""
    fewest = min(len(v) for v in NATURAL_STATEMENTS.values())
    for name, (low, high) in {**_KNOB_RANGES, "phrasings": (1, fewest)}.items():
        value = getattr(knobs, name)
        integral = isinstance(low, int)
        if isinstance(value, bool) or not isinstance(value, (int,) if integral else (int, float)) or not low <= value <= high:
            extra = (f" (every relation has at least {fewest} natural phrasings)" if name == "phrasings" else "")
            raise ValueError(f"{prefix}.{name}={value!r} is out of range: give {'an integer' if integral else 'a number'} "
                             f"in [{low}, {high}]{extra}.")
    forms = knobs.alias_share + knobs.short_form_share + knobs.pronoun_share
    if forms > 1.0 + 1e-9:
        raise ValueError(f"{prefix}.alias_share + short_form_share + pronoun_share = {forms:g} exceeds 1: they are "
                         "shares of one mention's surface form; lower them so they sum to at most 1.")


def natural_knobs(values: dict | None) -> NaturalKnobs:
    """Knobs from a mapping (a config block), naming an unknown key and the known ones."""
    values = dict(values or {})
    known = set(NaturalKnobs.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"world.natural: unknown knob(s) {unknown}; the knobs are {', '.join(sorted(known))}.")
    return NaturalKnobs(**values)


def style_knobs(style: str, knobs=None) -> NaturalKnobs | None:
    """The knobs a world of ``style`` is built with: for ``natural``, ``knobs`` (knobs, a
    mapping, or None for the defaults); for ``templated``, None, refusing knobs moved
    from their defaults (they would be silently ignored)."""
    check_style(style)
    if knobs is not None and not isinstance(knobs, NaturalKnobs):
        knobs = natural_knobs(knobs)
    if style == "natural":
        return knobs or NaturalKnobs()
    if knobs is not None and knobs != NaturalKnobs():
        raise ValueError("world.natural knobs apply to world.style=natural only; drop them or set "
                         "world.style=natural.")
    return None


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"world.style={style!r} is not a world style: choose one of {', '.join(STYLES)}.")
    return style
