"""Deterministic generator of the embedded default knowledge base (`refrag/data/kb/`).

The corpus describes fictional people, companies, cities and inventions, so a model
cannot answer from pretraining memory. It contains

- entity documents (one per person, company, city, invention),
- distractor documents: event reports that mention several entities without the
  asked facts, people sharing surnames, companies sharing a name root,
- contradictory documents: two census reports per city and two leadership reports
  per company, from different sources and dates; the gold answer is the most recent,
- query splits `queries/{train,val,test}.jsonl` with fields id, question, answer,
  type (single_hop | two_hop | contradictory | unanswerable), gold_doc_ids (in hop
  order) and, for two-hop questions, `hops`: [{query, doc_id, answer}].

Unanswerable questions ask about entities absent from the corpus or about facts no
document states; their gold answer is "I don't know" and gold_doc_ids is empty.

Other worlds: ``--names training`` (the procedurally generated worlds the demo trains on: more
syllable parts, 1-3 syllables, hyphenated, numbered and two-word names) and ``--names heldout``
(a disjoint syllable set, for a KB no training step has seen); ``--varied-documents`` shuffles
each document's sentences and adds fillers, so the answer sits at any position.

Usage: python -m refrag.data.make_kb [--out refrag/data/kb] [--seed 20240611] [--names embedded]
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from refrag import fileio
from refrag.data.answers import IDK

DEFAULT_SEED = 20240611
SPLIT_SIZES = {"test": 200, "val": 200}

ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p",
          "qu", "r", "s", "st", "t", "tr", "v", "vr", "z", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "y"]
CODAS = ["", "n", "r", "l", "s", "th", "nd", "rk", "m", "x", "sk", "v"]
COUNTRIES = ["Caldoria", "Vesmark", "Orrenland", "Tavoria", "Pelmarra", "Quessia", "Droveth", "Saldane"]
RIVERS = ["Ferro", "Alune", "Sable", "Mirren", "Calde", "Osk", "Vanta", "Brisk", "Tolle", "Hesper",
          "Umbra", "Kessa", "Lorn", "Dwel", "Istra", "Marrow", "Pell", "Rhune"]
LANDMARKS = ["glass bridge", "clock market", "salt harbor", "copper cathedral", "floating gardens",
             "lantern festival", "stone observatory", "spice docks", "old mint", "wind terraces"]
ROLES = ["glassmaker", "cartographer", "chemist", "engineer", "architect", "botanist", "economist",
         "physician", "geologist", "software designer", "shipwright", "astronomer", "metallurgist",
         "linguist", "acoustician"]
HOBBIES = ["restoring antique clocks", "breeding carrier pigeons", "rowing on the lake",
           "writing chess problems", "collecting meteorites", "playing the hurdy-gurdy",
           "mapping mountain trails", "tending beehives", "building kites", "watching the night sky"]
INDUSTRIES = {"energy": ["tidal turbines", "solar kilns", "wind pumps"],
              "optics": ["signal lenses", "brass telescopes", "prism lamps"],
              "transport": ["cable ferries", "electric barges", "rail carriages"],
              "textiles": ["fireproof canvas", "woven cables", "weatherproof wool"],
              "instruments": ["tide gauges", "pressure clocks", "seismic drums"],
              "chemicals": ["mineral dyes", "lamp oils", "preserving salts"]}
COMPANY_SUFFIXES = ["Systems", "Works", "Dynamics", "Industries", "Foundry", "Labs", "Consortium", "Guild"]
INVENTION_ADJS = ["Glimmer", "Tidal", "Silent", "Spiral", "Amber", "Folding", "Hollow", "Radiant",
                  "Copper", "Drifting", "Lattice", "Quiet", "Ember", "Crystal", "Woven", "Vapor"]
INVENTION_NOUNS = ["Lamp", "Loom", "Compass", "Engine", "Valve", "Press", "Lens", "Pump", "Kiln", "Bell",
                   "Sextant", "Filter"]
PURPOSES = ["measuring river currents", "purifying well water", "sorting wool fibers", "signalling ships at night",
            "drying grain without fire", "recording small earthquakes", "cutting glass precisely",
            "storing heat overnight", "guiding miners underground", "tuning church bells"]
NEWS_SOURCES = ["Vesmark Ledger", "Caldoria Courier", "Orrenland Gazette", "Tavoria Herald"]
FILLERS = ["Local historians describe the period as one of rapid change.",
           "Archived letters from the time survive in several regional libraries.",
           "The details were later summarised in a regional yearbook.",
           "Visitors often mention the surrounding countryside and its long winters.",
           "Several later accounts repeat these facts with minor differences in wording."]


@dataclass
class Person:
    key: str
    first: str
    last: str
    role: str
    birth_city: str
    birth_year: int | None
    employer: str = ""
    hobby: str = ""

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass
class Company:
    key: str
    name: str
    industry: str
    product: str
    founder: str
    founded: int | None
    hq: str
    ceo_old: str = ""
    ceo_new: str = ""


@dataclass
class City:
    key: str
    name: str
    country: str
    river: str
    founded: int
    landmark: str
    population_old: int = 0
    population_new: int = 0


@dataclass
class Invention:
    key: str
    name: str
    inventor: str
    year: int
    purpose: str


@dataclass(frozen=True)
class NameStyle:
    """How a world's names are drawn: syllable parts, syllables per word, and the shares of
    names that are hyphenated, carry a number, or have a second word."""

    onsets: tuple[str, ...]
    vowels: tuple[str, ...]
    codas: tuple[str, ...]
    syllables: tuple[int, int] = (2, 2)
    hyphen: float = 0.0
    digits: float = 0.0
    multiword: float = 0.0


# "embedded": the embedded KB (two syllables, 4-9 letters); "training": the procedurally generated
# worlds training reads from (more syllable parts, 1-3 syllables, hyphens, numbers, two-word names);
# "heldout": a disjoint syllable set for the held-out evaluation KB that no training step sees.
NAME_STYLES = {
    "embedded": NameStyle(tuple(ONSETS), tuple(VOWELS), tuple(CODAS)),
    "training": NameStyle(tuple(ONSETS + ["kw", "zh", "pf", "tl", "mb", "ng", "cz", "x", "ph", "gh", "sl", "dw",
                                          "tw", "rh", "kn", "ts"]),
                          tuple(VOWELS + ["oa", "ei", "ou", "uu", "aa", "ea", "ia"]),
                          tuple(CODAS + ["ft", "lk", "rn", "ts", "zz", "q", "nk", "ps"]),
                          syllables=(1, 3), hyphen=0.15, digits=0.1, multiword=0.15),
    "heldout": NameStyle(("j", "w", "bl", "gl", "kl", "pl", "fr", "sn", "sp", "sw", "ch", "wh", "y", "fl", "cr"),
                         ("oo", "ee", "ai", "au", "ue", "eu", "oi"),
                         ("", "ck", "mp", "lt", "rch", "ff", "ll", "b", "g"),
                         syllables=(1, 2), hyphen=0.05, digits=0.05, multiword=0.05),
}


class NameGenerator:
    """Draws unique pronounceable fictional names from syllables (`NAME_STYLES`)."""

    def __init__(self, rng: random.Random, style: str = "embedded"):
        if style not in NAME_STYLES:
            raise ValueError(f"unknown name style {style!r}; expected one of {sorted(NAME_STYLES)}")
        self.rng, self.style_name, self.style = rng, style, NAME_STYLES[style]
        self.used: set[str] = set()

    def syllable(self) -> str:
        style = self.style
        return self.rng.choice(style.onsets) + self.rng.choice(style.vowels) + self.rng.choice(style.codas)

    def word(self, min_len: int = 4, max_len: int = 9) -> str:
        if self.style_name != "embedded":
            return self.styled_word(short=max_len <= 7)
        while True:
            w = (self.syllable() + self.syllable()).capitalize()
            if min_len <= len(w) <= max_len and w not in self.used and not re.search(r"(.)\1", w.lower()):
                self.used.add(w)
                return w

    def styled_word(self, short: bool) -> str:
        """A name of the style: 1..N syllables, sometimes hyphenated, numbered or two words."""
        style, rng = self.style, self.rng
        low, high = style.syllables
        while True:
            part = lambda: "".join(self.syllable() for _ in range(rng.randint(low, high - short))).capitalize()  # noqa: E731
            w = part()
            if rng.random() < style.hyphen:
                w += "-" + part()
            if not short and rng.random() < style.multiword:
                w += " " + part()
            if rng.random() < style.digits:
                w += str(rng.randint(2, 99))
            if len(w) >= 2 and w not in self.used:
                self.used.add(w)
                return w


# Capitalised words of the templates and fixed lists that are not names (what `generated_names` skips).
TEMPLATE_WORDS = frozenset(w for text in [*COMPANY_SUFFIXES, *INVENTION_ADJS, *INVENTION_NOUNS, *NEWS_SOURCES, *FILLERS,
                                          "The River Innovation Fair"]
                           for w in re.findall(r"[A-Z][a-z]+", text)) - set(COUNTRIES) - set(RIVERS)


def _name_pattern(style: NameStyle) -> re.Pattern:
    def alt(parts):
        return "(?:" + "|".join(sorted((re.escape(p) for p in parts if p), key=len, reverse=True)) + ")"
    syllable = f"{alt(style.onsets)}{alt(style.vowels)}{alt(style.codas)}?"
    word = rf"(?=[A-Z])(?i:(?:{syllable}){{1,6}})"
    fixed = "|".join(COUNTRIES + RIVERS)
    return re.compile(rf"(?<![\w-])(?:{fixed}|{word}(?:-{word})?\d*)(?![\w-])")


# Embedded-style names are training-style names too (its syllable parts are a subset).
_GENERATED_NAME = _name_pattern(NAME_STYLES["training"])


def generated_names(text: str) -> list[str]:
    """The words of `text` a NameGenerator of the embedded or training style (or the fixed country and
    river lists) could have drawn, in order, without template words ("Industries", "The", ...).
    Template-free English words that happen to parse as syllables are rare and harmless to rename."""
    return [m.group(0) for m in _GENERATED_NAME.finditer(text) if m.group(0) not in TEMPLATE_WORDS]


class World:
    """All fictional entities, drawn deterministically from one seed."""

    def __init__(self, seed: int, n_people: int = 140, n_companies: int = 48, n_cities: int = 36,
                 n_inventions: int = 48, names: str = "embedded"):
        self.rng = random.Random(seed)
        self.names = NameGenerator(self.rng, names)
        # Other styles also draw their countries and rivers (the embedded KB's are fixed lists).
        generated = names != "embedded"
        self.countries = [self.names.word() for _ in COUNTRIES] if generated else COUNTRIES
        self.rivers = [self.names.word() for _ in RIVERS] if generated else RIVERS
        self.cities = [self._city(i) for i in range(n_cities)]
        surnames = [self.names.word() for _ in range(n_people * 2 // 3)]
        self.people = [self._person(i, surnames) for i in range(n_people)]
        roots = [self.names.word() for _ in range(n_companies * 2 // 3)]
        self.companies = self._companies(n_companies, roots)
        self._assign_employers()
        self.inventions = self._inventions(n_inventions)
        self.person_by_name = {p.name: p for p in self.people}
        self.company_by_name = {c.name: c for c in self.companies}
        self.city_by_name = {c.name: c for c in self.cities}

    def _city(self, i: int) -> City:
        old = self.rng.randrange(20, 400) * 1000
        return City(key=f"city-{i:03d}", name=self.names.word(), country=self.rng.choice(self.countries),
                    river=self.rng.choice(self.rivers) + " River", founded=self.rng.randrange(800, 1700),
                    landmark=self.rng.choice(LANDMARKS), population_old=old,
                    population_new=old + self.rng.randrange(5, 60) * 1000)

    def _person(self, i: int, surnames: list[str]) -> Person:
        while True:
            first, last = self.names.word(3, 7), self.rng.choice(surnames)
            if first != last:
                break
        year = self.rng.randrange(1890, 1995) if self.rng.random() > 0.15 else None
        return Person(key=f"person-{i:03d}", first=first, last=last, role=self.rng.choice(ROLES),
                      birth_city=self.rng.choice(self.cities).name, birth_year=year,
                      hobby=self.rng.choice(HOBBIES))

    def _companies(self, n: int, roots: list[str]) -> list[Company]:
        founders = self.rng.sample(self.people, n)
        names: set[str] = set()
        companies = []
        for i, founder in enumerate(founders):
            while True:
                name = f"{self.rng.choice(roots)} {self.rng.choice(COMPANY_SUFFIXES)}"
                if name not in names:
                    names.add(name)
                    break
            industry = self.rng.choice(sorted(INDUSTRIES))
            founded = founder.birth_year + self.rng.randrange(22, 45) if founder.birth_year else self.rng.randrange(1920, 2020)
            companies.append(Company(
                key=f"company-{i:03d}", name=name, industry=industry,
                product=self.rng.choice(INDUSTRIES[industry]), founder=founder.name,
                founded=founded if self.rng.random() > 0.1 else None, hq=self.rng.choice(self.cities).name))
            founder.employer = name
        return companies

    def _assign_employers(self) -> None:
        for p in self.people:
            if not p.employer:
                p.employer = self.rng.choice(self.companies).name
        for c in self.companies:
            staff = [p.name for p in self.people if p.employer == c.name and p.name != c.founder]
            pool = staff if len(staff) >= 2 else [p.name for p in self.people if p.name != c.founder]
            c.ceo_old, c.ceo_new = self.rng.sample(pool, 2)

    def _inventions(self, n: int) -> list[Invention]:
        names: set[str] = set()
        inventions = []
        for i in range(n):
            while True:
                name = f"{self.rng.choice(INVENTION_ADJS)} {self.rng.choice(INVENTION_NOUNS)}"
                if name not in names:
                    names.add(name)
                    break
            inventor = self.rng.choice(self.people)
            inventions.append(Invention(key=f"invention-{i:03d}", name=name, inventor=inventor.name,
                                        year=self.rng.randrange(1900, 2024), purpose=self.rng.choice(PURPOSES)))
        return inventions


def doc(doc_id: str, title: str, sentences: list[str], source: str, rng: random.Random,
        metadata: dict | None = None) -> dict:
    """One document record; pads with 0-2 neutral filler sentences, and up to at least 40 words."""
    content = " ".join(sentences)
    fillers = rng.sample(FILLERS, len(FILLERS))
    for _ in range(rng.randrange(3)):
        content += " " + fillers.pop()
    while len(content.split()) < 40:
        content += " " + fillers.pop()
    words = len(content.split())
    if words > 120:
        raise ValueError(f"document {doc_id} has {words} words, above the 120-word budget")
    record = {"id": doc_id, "title": title, "content": content, "source": source}
    if metadata:
        record["metadata"] = metadata
    return record


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def person_doc(p: Person, rng: random.Random) -> dict:
    born = f"in {p.birth_city} in {p.birth_year}" if p.birth_year else f"in {p.birth_city}"
    return doc(p.key, p.name, [
        f"{p.name} is {article(p.role)} {p.role} who was born {born}.",
        f"{p.first} {p.last} works for {p.employer}, where colleagues know {p.last} for careful, patient work.",
        f"Outside work, {p.first} spends most weekends {p.hobby}.",
    ], "biographies", rng, {"type": "person"})


def company_doc(c: Company, rng: random.Random) -> dict:
    founded = f"founded in {c.founded} by {c.founder}" if c.founded else f"founded by {c.founder}"
    return doc(c.key, c.name, [
        f"{c.name} is {article(c.industry)} {c.industry} company {founded}.",
        f"Its headquarters are in {c.hq}.",
        f"The company is best known for its {c.product}, which it sells across {rng.choice(COUNTRIES)} and beyond.",
    ], "company-registry", rng, {"type": "company"})


def city_doc(c: City, rng: random.Random) -> dict:
    return doc(c.key, c.name, [
        f"{c.name} is a city in {c.country}, founded in {c.founded}.",
        f"The {c.river} flows through the city center.",
        f"{c.name} is famous for its {c.landmark}, which draws travellers every summer.",
    ], "atlas", rng, {"type": "city"})


def invention_doc(inv: Invention, rng: random.Random) -> dict:
    return doc(inv.key, f"The {inv.name}", [
        f"The {inv.name} is a device for {inv.purpose}.",
        f"It was invented by {inv.inventor} in {inv.year}.",
        f"Early versions of the {inv.name} were built by hand and tested in small workshops.",
    ], "patent-archive", rng, {"type": "invention"})


def census_docs(c: City, rng: random.Random) -> list[dict]:
    old_year, new_year = rng.randrange(1995, 2012), rng.randrange(2015, 2024)
    return [
        doc(f"{c.key}-census-a", f"{c.name} population ({old_year} census)", [
            f"According to the {old_year} census published by the {c.country} statistics office, "
            f"{c.name} has {c.population_old:,} residents.",
            "Most residents live close to the river and the old market districts.",
        ], "census-office", rng, {"type": "census", "date": f"{old_year}-06-30"}),
        doc(f"{c.key}-census-b", f"{c.name} population ({new_year} survey)", [
            f"A {new_year} survey reported by the {rng.choice(NEWS_SOURCES)} counts {c.population_new:,} residents in {c.name}.",
            "The report credits new housing along the waterfront for the change.",
        ], "news", rng, {"type": "census", "date": f"{new_year}-03-15"}),
    ]


def leadership_docs(c: Company, rng: random.Random) -> list[dict]:
    old_year, new_year = rng.randrange(2005, 2015), rng.randrange(2018, 2025)
    return [
        doc(f"{c.key}-ceo-a", f"{c.name} leadership ({old_year})", [
            f"In a {old_year} filing, {c.name} listed {c.ceo_old} as its chief executive.",
            "The filing also described plans to expand production.",
        ], "company-registry", rng, {"type": "leadership", "date": f"{old_year}-01-10"}),
        doc(f"{c.key}-ceo-b", f"{c.name} leadership ({new_year})", [
            f"As of {new_year}, {c.name} is led by chief executive {c.ceo_new}, according to the {rng.choice(NEWS_SOURCES)}.",
            "Analysts expect the company to focus on export markets.",
        ], "news", rng, {"type": "leadership", "date": f"{new_year}-09-01"}),
    ]


def event_doc(i: int, world: World, rng: random.Random) -> dict:
    """A distractor: mentions a city, two people, a company and an invention without the asked facts."""
    city = rng.choice(world.cities)
    p1, p2 = rng.sample(world.people, 2)
    company = rng.choice(world.companies)
    inv = rng.choice(world.inventions)
    year = rng.randrange(1950, 2024)
    return doc(f"event-{i:03d}", f"{year} {city.name} Innovation Fair", [
        f"The {year} Innovation Fair in {city.name} drew exhibitors from {city.country} and abroad.",
        f"{p1.name} gave a talk on {p1.role} work, and {p2.name} chaired a panel on the {inv.name}.",
        f"{company.name} showed a prototype of its {company.product} near the entrance.",
    ], "news", rng, {"type": "event", "date": f"{year}-05-01"})


def namesake_doc(i: int, world: World, rng: random.Random) -> dict:
    """A distractor about a minor figure sharing a surname with a KB person."""
    p = rng.choice(world.people)
    first = world.names.word(3, 7)
    city = rng.choice(world.cities).name
    role = rng.choice(ROLES)
    return doc(f"namesake-{i:03d}", f"{first} {p.last}", [
        f"{first} {p.last} is a retired {role} who spent many years in {city}.",
        f"{first} is sometimes confused with {p.name}, although the two are not related.",
        f"{first} now spends free time {rng.choice(HOBBIES)}.",
    ], "blogs", rng, {"type": "namesake"})


def question(type_: str, q: str, answer: str, gold: list[str], hops: list[dict] | None = None) -> dict:
    rec = {"question": q, "answer": answer, "type": type_, "gold_doc_ids": gold}
    if hops:
        rec["hops"] = hops
    return rec


def single_hop_questions(world: World, rng: random.Random) -> list[dict]:
    qs = []
    for p in world.people:
        qs.append(question("single_hop", rng.choice([f"In which city was {p.name} born?", f"Where was {p.name} born?"]),
                           p.birth_city, [p.key]))
        qs.append(question("single_hop", rng.choice([f"Which company does {p.name} work for?", f"Who employs {p.name}?"]),
                           p.employer, [p.key]))
        qs.append(question("single_hop", f"What is the profession of {p.name}?", p.role, [p.key]))
        if p.birth_year:
            qs.append(question("single_hop", f"In what year was {p.name} born?", str(p.birth_year), [p.key]))
    for c in world.companies:
        qs.append(question("single_hop", f"Who founded {c.name}?", c.founder, [c.key]))
        qs.append(question("single_hop", rng.choice([f"In which city is {c.name} headquartered?",
                                                     f"Where are the headquarters of {c.name}?"]), c.hq, [c.key]))
        qs.append(question("single_hop", f"What is {c.name} best known for?", c.product, [c.key]))
        if c.founded:
            qs.append(question("single_hop", f"In what year was {c.name} founded?", str(c.founded), [c.key]))
    for c in world.cities:
        qs.append(question("single_hop", f"In which country is {c.name}?", c.country, [c.key]))
        qs.append(question("single_hop", f"Which river flows through {c.name}?", c.river, [c.key]))
        qs.append(question("single_hop", f"In what year was the city of {c.name} founded?", str(c.founded), [c.key]))
    for inv in world.inventions:
        qs.append(question("single_hop", f"Who invented the {inv.name}?", inv.inventor, [inv.key]))
        qs.append(question("single_hop", f"In what year was the {inv.name} invented?", str(inv.year), [inv.key]))
    return qs


def two_hop(q: str, first: tuple[str, str, str], second: tuple[str, str, str]) -> dict:
    """first/second: (hop query, doc id, hop answer); the final answer is the second hop's."""
    hops = [{"query": h[0], "doc_id": h[1], "answer": h[2]} for h in (first, second)]
    return question("two_hop", q, second[2], [first[1], second[1]], hops)


def two_hop_questions(world: World) -> list[dict]:
    qs = []
    people, cities, companies = world.person_by_name, world.city_by_name, world.company_by_name
    for c in world.companies:
        f = people[c.founder]
        found = (f"Who founded {c.name}?", c.key, f.name)
        qs.append(two_hop(f"In which city was the founder of {c.name} born?", found,
                          (f"In which city was {f.name} born?", f.key, f.birth_city)))
        if f.birth_year:
            qs.append(two_hop(f"In what year was the founder of {c.name} born?", found,
                              (f"In what year was {f.name} born?", f.key, str(f.birth_year))))
        hq = cities[c.hq]
        qs.append(two_hop(f"In which country is {c.name} headquartered?",
                          (f"In which city is {c.name} headquartered?", c.key, hq.name),
                          (f"In which country is {hq.name}?", hq.key, hq.country)))
    for inv in world.inventions:
        p = people[inv.inventor]
        made = (f"Who invented the {inv.name}?", inv.key, p.name)
        qs.append(two_hop(f"Which company employs the inventor of the {inv.name}?", made,
                          (f"Which company does {p.name} work for?", p.key, p.employer)))
        qs.append(two_hop(f"Where was the inventor of the {inv.name} born?", made,
                          (f"In which city was {p.name} born?", p.key, p.birth_city)))
    for p in world.people:
        city, employer = cities[p.birth_city], companies[p.employer]
        qs.append(two_hop(f"Which river flows through the city where {p.name} was born?",
                          (f"In which city was {p.name} born?", p.key, city.name),
                          (f"Which river flows through {city.name}?", city.key, city.river)))
        works = (f"Which company does {p.name} work for?", p.key, employer.name)
        if employer.founder != p.name:
            qs.append(two_hop(f"Who founded the company that {p.name} works for?", works,
                              (f"Who founded {employer.name}?", employer.key, employer.founder)))
        qs.append(two_hop(f"In which city is the employer of {p.name} headquartered?", works,
                          (f"In which city is {employer.name} headquartered?", employer.key, employer.hq)))
    return qs


def contradictory_questions(world: World, rng: random.Random) -> list[dict]:
    qs = []
    for c in world.cities:
        q = rng.choice([f"What is the most recent population figure for {c.name}?",
                        f"According to the latest report, how many residents does {c.name} have?"])
        qs.append(question("contradictory", q, f"{c.population_new:,}", [f"{c.key}-census-b", f"{c.key}-census-a"]))
    for c in world.companies:
        q = rng.choice([f"Who is the current chief executive of {c.name}?", f"Who leads {c.name} today?"])
        qs.append(question("contradictory", q, c.ceo_new, [f"{c.key}-ceo-b", f"{c.key}-ceo-a"]))
    return qs


def unanswerable_questions(world: World, rng: random.Random, n_fake: int) -> list[dict]:
    """Questions about absent entities (same templates as answerable ones) and unstated facts."""
    qs = [question("unanswerable", f"In what year was {p.name} born?", IDK, [])
          for p in world.people if p.birth_year is None]
    qs += [question("unanswerable", f"In what year was {c.name} founded?", IDK, [])
           for c in world.companies if c.founded is None]
    surnames = sorted({p.last for p in world.people})
    roots = sorted({c.name.split()[0] for c in world.companies})
    for _ in range(n_fake):
        kind = rng.randrange(4)
        if kind == 0:
            name = f"{world.names.word(3, 7)} {rng.choice(surnames)}"
            q = rng.choice([f"In which city was {name} born?", f"Which company does {name} work for?",
                            f"What is the profession of {name}?"])
        elif kind == 1:
            name = f"{rng.choice(roots)} {world.names.word()}"
            q = rng.choice([f"Who founded {name}?", f"In which city is {name} headquartered?"])
        elif kind == 2:
            name = f"{world.names.word()} {rng.choice(INVENTION_NOUNS)}"
            q = rng.choice([f"Who invented the {name}?", f"In what year was the {name} invented?"])
        else:
            name = world.names.word()
            q = rng.choice([f"Which river flows through {name}?", f"In which country is {name}?"])
        qs.append(question("unanswerable", q, IDK, []))
    return qs


def build_documents(world: World, rng: random.Random, n_events: int = 60, n_namesakes: int = 30) -> list[dict]:
    docs = [person_doc(p, rng) for p in world.people]
    docs += [company_doc(c, rng) for c in world.companies]
    docs += [city_doc(c, rng) for c in world.cities]
    docs += [invention_doc(i, rng) for i in world.inventions]
    for c in world.cities:
        docs += census_docs(c, rng)
    for c in world.companies:
        docs += leadership_docs(c, rng)
    docs += [event_doc(i, world, rng) for i in range(n_events)]
    docs += [namesake_doc(i, world, rng) for i in range(n_namesakes)]
    return docs


def build_questions(world: World, rng: random.Random) -> list[dict]:
    qs = single_hop_questions(world, rng) + two_hop_questions(world) + contradictory_questions(world, rng)
    qs += unanswerable_questions(world, rng, n_fake=260)
    seen: set[str] = set()
    unique = []
    for q in qs:
        if q["question"] not in seen:
            seen.add(q["question"])
            unique.append(q)
    return unique


def split_questions(questions: list[dict], rng: random.Random) -> dict[str, list[dict]]:
    """Stratified by type: test and val take SPLIT_SIZES questions in type proportion, train the rest."""
    by_type: dict[str, list[dict]] = {}
    for q in questions:
        by_type.setdefault(q["type"], []).append(q)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    total = len(questions)
    for type_, items in sorted(by_type.items()):
        rng.shuffle(items)
        start = 0
        for split, size in SPLIT_SIZES.items():
            n = round(size * len(items) / total)
            splits[split] += items[start:start + n]
            start += n
        splits["train"] += items[start:]
    for split, items in splits.items():
        rng.shuffle(items)
        for i, q in enumerate(items):
            q["id"] = f"{split}-{i:04d}"
        splits[split] = [{"id": q.pop("id"), **q} for q in items]
    return splits


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_jsonl(path, records)


def vary_documents(docs: list[dict], rng: random.Random) -> list[dict]:
    """Documents with their sentences in a random order and 0-3 further filler sentences
    interleaved, so the asked fact sits at any position and documents vary in length."""
    out = []
    for d in docs:
        sentences = re.split(r"(?<=[.!?]) (?=[A-Z])", d["content"])
        rng.shuffle(sentences)
        for filler in rng.sample(FILLERS, rng.randrange(4)):
            if filler not in sentences:
                sentences.insert(rng.randrange(len(sentences) + 1), filler)
        out.append({**d, "content": " ".join(sentences)})
    return out


def build_kb(seed: int = DEFAULT_SEED, names: str = "embedded",
             varied_documents: bool = False) -> tuple[list[dict], dict[str, list[dict]]]:
    """(documents, {split: query records}) of the world drawn from `seed` with the `names` style."""
    rng = random.Random(seed + 1)
    world = World(seed, names=names)
    docs = build_documents(world, rng)
    if varied_documents:
        docs = vary_documents(docs, random.Random(f"{seed}:vary"))
    return docs, split_questions(build_questions(world, rng), rng)


def generate(out: Path, seed: int = DEFAULT_SEED, names: str = "embedded",
             varied_documents: bool = False) -> dict[str, int]:
    """Write documents.jsonl and queries/{train,val,test}.jsonl under `out`; returns record counts."""
    docs, splits = build_kb(seed, names, varied_documents)
    write_jsonl(out / "documents.jsonl", docs)
    for split, items in splits.items():
        write_jsonl(out / "queries" / f"{split}.jsonl", items)
    return {"documents": len(docs), **{s: len(v) for s, v in splits.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "kb", help="output directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed")
    parser.add_argument("--names", default="embedded", choices=sorted(NAME_STYLES),
                        help="name generator: embedded (the shipped KB), training (the generated training "
                             "worlds) or heldout (a syllable set no training step sees)")
    parser.add_argument("--varied-documents", action="store_true",
                        help="shuffle each document's sentences and add fillers (answer at any position)")
    args = parser.parse_args(argv)
    counts = generate(args.out, args.seed, args.names, args.varied_documents)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
