"""The language of a class name, and the prompt templates for it.

Ten languages have templates (those RS-M-CLIP was trained on): English uses the method's 80 OpenAI
templates, the others a short remote-sensing set from resources/templates/<code>.txt. A class name's
language is either forced (`--language`) or detected per query, so one class line may mix languages:
- by script: Hangul -> ko, Han ideographs -> zh, Cyrillic -> ru;
- in Latin script, by letters only one language uses (ß -> de, ñ -> es, ã/õ -> pt, ...), then by
  common land-cover words of each language;
- anything else (no signal, or a script without templates such as Arabic or Hebrew) -> English, the
  documented fallback.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

# Declared with the --language option; kept importable here, where the templates are.
from .options import LANGUAGES, check_language  # noqa: F401
from .paths import resources_dir

ENGLISH_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
FALLBACK = "en"

_SCRIPTS = (
    ("ko", re.compile(r"[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")),
    ("zh", re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")),
    ("ru", re.compile(r"[\u0400-\u04ff]")),
)
_OTHER_SCRIPT = re.compile(r"[\u0590-\u08ff\u0900-\u0dff\u0e00-\u0eff\u3040-\u30ff\u0370-\u03ff]")
# Letters that, among the ten languages, only one of them writes.
_LETTERS = {"de": "ßäöü", "es": "ñ¿¡", "pt": "ãõ", "fr": "œæëïûùÿ", "it": "ìò"}
# Common land-cover and map words (lower case, accents as written).
_WORDS = {
    "en": "building buildings road roads river water tree trees forest field fields grass farmland house houses "
          "roof car cars parking lot bare land sea lake beach bridge railway low vegetation impervious surface "
          "and of the with",
    "pt": "edifício edifícios prédio casa casas estrada estradas rio água árvore árvores floresta campo campos "
          "relva telhado carro carros estacionamento solo exposto terreno mar lago praia ponte via férrea "
          "vegetação cultivo de do da dos das e com",
    "es": "edificio edificios casa casas carretera carreteras calle río agua árbol árboles bosque campo campos "
          "hierba césped tejado coche coches aparcamiento suelo desnudo terreno mar lago playa puente vía "
          "vegetación cultivo de del la el los las y con",
    "fr": "bâtiment bâtiments maison maisons route routes rivière fleuve eau arbre arbres forêt champ champs "
          "herbe prairie toit voiture voitures parking sol nu terrain mer lac plage pont voie ferrée "
          "végétation culture de du des la le les et avec",
    "de": "gebäude haus häuser straße strasse straßen fluss wasser baum bäume wald feld felder wiese gras dach "
          "auto autos parkplatz boden acker see meer strand brücke bahn vegetation der die das und mit",
    "nl": "gebouw gebouwen huis huizen weg wegen straat rivier water boom bomen bos veld velden gras dak "
          "auto's parkeerplaats grond akker zee meer strand brug spoorweg vegetatie het een en van met",
    "it": "edificio edifici casa case strada strade fiume acqua albero alberi foresta bosco campo campi erba "
          "prato tetto auto parcheggio suolo terreno mare lago spiaggia ponte ferrovia vegetazione di del "
          "della e con",
}
_WORD_SETS = {lang: frozenset(words.split()) for lang, words in _WORDS.items()}
_TOKEN = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)


def detect_language(text: str) -> str | None:
    """The language of a class name when there is a clear signal, else None (-> English)."""
    name = unicodedata.normalize("NFC", text).lower()
    for code, pattern in _SCRIPTS:
        if pattern.search(name):
            return code
    if _OTHER_SCRIPT.search(name):
        return None
    for code, letters in _LETTERS.items():
        if any(ch in name for ch in letters):
            return code
    words = _TOKEN.findall(name)
    scores = {lang: sum(word in vocab for word in words) for lang, vocab in _WORD_SETS.items()}
    best = max(scores.values(), default=0)
    if best == 0:
        return None
    leaders = [lang for lang, score in scores.items() if score == best]
    if "en" in leaders:
        return "en"
    return leaders[0] if len(leaders) == 1 else None


def query_language(query: str, forced: str | None = None) -> str:
    return forced or detect_language(query) or FALLBACK


def non_english(queries: list[str]) -> list[str]:
    """Queries that are clearly not English (a non-Latin script, or a detected other language)."""
    out = []
    for query in queries:
        lang = detect_language(query)
        if (lang is not None and lang != "en") or _OTHER_SCRIPT.search(query):
            out.append(query)
    return out


@functools.lru_cache(maxsize=16)
def templates_for(language: str) -> tuple[str, ...]:
    """The prompt templates of `language` (English: the method's 80 OpenAI templates)."""
    if language == "en":
        return ENGLISH_TEMPLATES
    path = resources_dir() / "templates" / f"{language}.txt"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    templates = tuple(line for line in lines if line and not line.startswith("#"))
    assert templates and all("{}" in t for t in templates), f"bad template file {path}"
    return templates
