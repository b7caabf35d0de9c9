"""Relations of the embedded fact world, with their text templates.

Each relation carries its Wikidata property id (as in T-REx), several corpus
templates that state a fact, and three cloze query templates that end right
before the object (the release's ``prompt0/1/2``). ``{s}`` is the subject,
``{o}`` the object and ``{a_o}`` the object with its indefinite article.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    pid: str
    label: str
    subject_type: str
    object_type: str
    statements: tuple[str, ...]
    prompts: tuple[str, str, str]

    @property
    def predicate_uri(self) -> str:
        return f"http://www.wikidata.org/entity/{self.pid}"


RELATIONS: dict[str, Relation] = {
    r.pid: r
    for r in (
        Relation(
            "P36", "capital", "country", "city",
            (
                "The capital of {s} is {o}.",
                "{o} is the capital of {s}.",
                "The capital city of {s} is {o}.",
                "The government of {s} meets in its capital, {o}.",
            ),
            ("The capital of {s} is", "The capital city of {s} is", "The government of {s} meets in its capital,"),
        ),
        Relation(
            "P30", "continent", "country", "continent",
            (
                "{s} is a country in {o}.",
                "{s} is located on the continent of {o}.",
                "The nation of {s} lies in {o}.",
            ),
            ("{s} is a country in", "{s} is located on the continent of", "The nation of {s} lies in"),
        ),
        Relation(
            "P38", "currency", "country", "currency",
            (
                "The currency of {s} is the {o}.",
                "In {s}, people pay with the {o}.",
                "{s} uses the {o} as its official currency.",
            ),
            ("The currency of {s} is the", "In {s}, people pay with the", "The official currency of {s} is the"),
        ),
        Relation(
            "P47", "shares border with", "country", "country",
            (
                "{s} shares a border with {o}.",
                "{s} borders {o}.",
                "Travelers can cross from {s} into neighbouring {o}.",
            ),
            ("{s} shares a border with", "{s} borders", "Travelers can cross from {s} into neighbouring"),
        ),
        Relation(
            "P17", "country", "city", "country",
            (
                "{s} is a city in {o}.",
                "The city of {s} is located in {o}.",
                "{s} lies in the country of {o}.",
            ),
            ("{s} is a city in", "The city of {s} is located in", "{s} lies in the country of"),
        ),
        Relation(
            "P19", "place of birth", "person", "city",
            (
                "{s} was born in {o}.",
                "The birthplace of {s} is {o}.",
                "Born in {o}, {s} spent a childhood there.",
            ),
            ("{s} was born in", "The birthplace of {s} is", "{s} was born in the city of"),
        ),
        Relation(
            "P27", "country of citizenship", "person", "country",
            (
                "{s} is a citizen of {o}.",
                "{s} holds citizenship of {o}.",
                "The passport of {s} was issued by {o}.",
            ),
            ("{s} is a citizen of", "{s} holds citizenship of", "The passport of {s} was issued by"),
        ),
        Relation(
            "P106", "occupation", "person", "occupation",
            (
                "The occupation of {s} is {o}.",
                "{s} works as {a_o}.",
                "By profession, {s} is {a_o}.",
            ),
            ("The occupation of {s} is", "{s} has the profession of", "The job title of {s} is"),
        ),
        Relation(
            "P108", "employer", "person", "organization",
            (
                "{s} works for {o}.",
                "{s} is employed by {o}.",
                "{o} employs {s}.",
            ),
            ("{s} works for", "{s} is employed by", "The employer of {s} is"),
        ),
        Relation(
            "P69", "educated at", "person", "university",
            (
                "{s} studied at {o}.",
                "{s} was educated at {o}.",
                "{s} graduated from {o}.",
            ),
            ("{s} studied at", "{s} was educated at", "{s} graduated from"),
        ),
    )
}

#: Sentences that mention one entity without stating any relation: the hard
#: negatives of the closed set and part of the open set's filler.
CONTEXT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "country": (
        "{e} has a long and varied history.",
        "Many tourists visit {e} every year.",
        "A trade delegation from {e} arrived last spring.",
        "The national football team of {e} won its last match.",
    ),
    "city": (
        "{e} is known for its old market.",
        "The streets of {e} are busy in summer.",
        "A new museum opened in {e} this year.",
        "Rain fell over {e} for most of the week.",
    ),
    "continent": ("Scientists study the climate of {e}.", "Migratory birds cross {e} every year."),
    "currency": ("The {e} rose slightly against other currencies.", "Collectors value old coins of the {e}."),
    "person": (
        "{e} gave a long interview last week.",
        "{e} enjoys reading in the evening.",
        "A portrait of {e} hangs in a small gallery.",
        "{e} spoke briefly at the ceremony.",
    ),
    "occupation": ("Being {a_e} takes years of practice.", "The demand for every {e} grew last decade."),
    "organization": ("{e} announced its yearly results.", "{e} opened a new office downtown."),
    "university": ("{e} has a large library.", "{e} admitted more students this year."),
}


def with_article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def render(template: str, subject: str, obj: str) -> str:
    return template.format(s=subject, o=obj, a_o=with_article(obj))


def render_context(template: str, entity: str) -> str:
    return template.format(e=entity, a_e=with_article(entity))
