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


#: The natural style's statement phrasings (``world.style=natural``), as T-REx
#: states facts: in the words of an encyclopedia, not of the query. No phrasing
#: contains one of its relation's prompts, and most share no content word with
#: any of them (tests check both). A phrasing that opens with ``{s} `` takes a
#: pronoun as its subject ("She grew up in Y"); the others never do.
NATURAL_STATEMENTS: dict[str, tuple[str, ...]] = {
    "P36": (
        "{s} is governed from {o}.",
        "{s} has its seat of power in {o}.",
        "{o} serves as the national seat of {s}.",
        "The parliament of {s} sits in {o}.",
        "The ministries of {s} are headquartered in {o}.",
        "{o} hosts the parliament and ministries of {s}.",
        "{s} runs its affairs of state from {o}.",
        "Ambassadors to {s} present their credentials in {o}.",
        "{o} is the capital of {s}.",
    ),
    "P30": (
        "{s} forms part of {o}.",
        "{s} belongs to {o}.",
        "{s} sits within {o}.",
        "Maps of {o} show {s} among its states.",
        "{s} is one of the states of {o}.",
        "{s} is found in {o}.",
        "Geographers place {s} in {o}.",
        "{s} is situated in {o}.",
        "{s} is a nation of {o}.",
    ),
    "P38": (
        "Shops in {s} take the {o}.",
        "{s} issues the {o}.",
        "Prices in {s} are quoted in the {o}.",
        "The {o} is the money of {s}.",
        "The central bank of {s} prints the {o}.",
        "Wages in {s} are paid in the {o}.",
        "{s} trades in the {o}.",
        "Visitors to {s} change their money into the {o}.",
        "The {o} is the legal tender of {s}.",
    ),
    "P47": (
        "{s} is adjacent to {o}.",
        "{s} lies next to {o}.",
        "{s} touches {o} along its frontier.",
        "The frontier of {s} runs along {o}.",
        "{s} is a neighbour of {o}.",
        "A land boundary separates {s} from {o}.",
        "{s} is next door to {o}.",
        "{o} lies across the frontier from {s}.",
        "{s} has a long border with {o}.",
    ),
    "P17": (
        "{s} is a town of {o}.",
        "{s} belongs to {o}.",
        "{s} sits in {o}.",
        "{s} is part of {o}.",
        "{s} is an urban centre of {o}.",
        "{o} counts {s} among its municipalities.",
        "{s} is a municipality in {o}.",
        "{s} is a settlement in {o}.",
        "{s} is one of the cities of {o}.",
    ),
    "P19": (
        "{s} is a native of {o}.",
        "{o}-born {s} has spoken of a happy childhood.",
        "{s} grew up in {o}.",
        "{s} came into the world in {o}.",
        "{s} hails from {o}.",
        "{s} was delivered in a hospital in {o}.",
        "The life of {s} began in {o}.",
        "{o} is the hometown of {s}.",
        "The birth of {s} took place in {o}.",
    ),
    "P27": (
        "{s} is a national of {o}.",
        "{s} carries the nationality of {o}.",
        "{s} belongs to the nation of {o}.",
        "{s} votes in the elections of {o}.",
        "{s} has the nationality of {o}.",
        "{s} travels on papers from {o}.",
        "{o} counts {s} among its nationals.",
        "{s} swore allegiance to {o}.",
        "{s} became a citizen of {o}.",
    ),
    "P106": (
        "{s} earns a living as {a_o}.",
        "{s} trained as {a_o}.",
        "{s} made a career as {a_o}.",
        "{s} is {a_o} by trade.",
        "As {a_o}, {s} is respected by peers.",
        "{s} practises as {a_o}.",
        "Colleagues know {s} as {a_o}.",
        "{s} spent decades as {a_o}.",
        "The profession of {s} is that of {a_o}.",
    ),
    "P108": (
        "{s} is on the staff of {o}.",
        "{s} draws a salary from {o}.",
        "{s} joined {o} and stayed.",
        "{o} has {s} on its payroll.",
        "{s} is part of the team at {o}.",
        "{s} holds a position at {o}.",
        "{s} reports to the managers of {o}.",
        "{s} has a post at {o}.",
        "{o} hired {s}.",
    ),
    "P69": (
        "{s} is an alumnus of {o}.",
        "{s} holds a degree from {o}.",
        "{s} attended {o}.",
        "{s} earned a diploma at {o}.",
        "{o} counts {s} among its former students.",
        "{s} took classes at {o} for four years.",
        "{s} completed a degree at {o}.",
        "{s} was a student at {o}.",
        "{s} studied for a degree at {o}.",
    ),
}

#: Someone or something close to a subject, for distractors that share the
#: subject's name and the relation's words but state another entity's fact
#: ("X's brother was born in Z"). Possessive only: the subject's name is never
#: the last word before a relation's words, so no phrasing of a fact about the
#: subject itself can match inside a distractor.
RELATIVE_PHRASES: dict[str, tuple[str, ...]] = {
    "person": ("{s}'s brother", "{s}'s sister", "{s}'s mother", "{s}'s father", "{s}'s wife", "{s}'s husband",
               "{s}'s business partner", "{s}'s oldest friend"),
    "country": ("{s}'s old rival", "{s}'s former colony", "{s}'s largest trading partner"),
    "city": ("{s}'s twin town", "{s}'s sister city"),
}

#: Short forms that refer back to an abstract's subject ("the city"), by type.
SHORT_FORMS: dict[str, str] = {
    "country": "the country", "city": "the city", "continent": "the continent", "currency": "the currency",
    "organization": "the company", "university": "the university",
}


def natural_render(template: str, subject: str, obj: str) -> str:
    """A natural phrasing filled in, its first letter capitalized (a short form may open it)."""
    text = render(template, subject, obj)
    return text[:1].upper() + text[1:]
