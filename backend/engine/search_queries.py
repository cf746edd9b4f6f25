"""What a `search` looks for, checked without the model: sentences, keywords and the search options.

Keyword rule (`split_keywords`): the sentence is cut at commas, semicolons, full stops and the
joining words "and", "with", "next to", "near", "beside", "besides", "by", "along", "around",
"surrounded by", "between", "in", "on", "at", "of"; leading and trailing filler words (articles,
quantities, "there is/are", "located", ...) are dropped from each part ("a lot of", "lots of", "a
number of", "a group of", "a row of" first); empty and repeated parts are dropped.
"a baseball field next to a parking lot" -> "baseball field", "parking lot".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import InputError
from .options import SENTENCE_MAX_CHARS, check_typed_text
from .presets import same_name_key

DEFAULT_TOP = 20
DEFAULT_MAX_OVERLAP = 0.5
MAX_QUERIES = 32

_JOINERS = ("surrounded by", "next to", "and", "with", "near", "besides", "beside", "by", "along", "around",
            "between", "in", "on", "at", "of")
# A joining word stands alone: never part of a hyphenated word ("built-in", "on-ramp", "stand-by").
_SPLIT = re.compile(r"[,;.]|(?<![\w-])(?:" + "|".join(j.replace(" ", r"\s+") for j in _JOINERS) + r")(?![\w-])")
_QUANTITY = re.compile(r"\b(?:a\s+lot|lots|a\s+number|a\s+couple|a\s+group|a\s+row|rows)\s+of\b")
_FILLER = {"a", "an", "the", "some", "many", "several", "few", "there", "is", "are", "was",
           "were", "be", "been", "being", "located", "lies", "lie", "lying", "stands", "stand", "standing",
           "sits", "sit", "which", "that", "it", "its", "this", "these", "those", "very", "one", "two",
           "three", "four", "five", "six", "seven", "eight", "nine", "ten", "other", "each", "both",
           "also", "here", "can", "seen", "see", "we", "parked", "built", "covered", "planted", "scattered"}


def split_keywords(sentence: str) -> list[str]:
    """Keyword phrases of a sentence by the documented rule (module docstring)."""
    keywords: list[str] = []
    for part in _SPLIT.split(_QUANTITY.sub(" ", sentence.lower())):
        words = [w for w in re.findall(r"[\w'-]+", part or "")]
        while words and (words[0] in _FILLER or words[0].isdigit()):
            words.pop(0)
        while words and (words[-1] in _FILLER or words[-1].isdigit()):
            words.pop()
        phrase = " ".join(words)
        if phrase and phrase not in keywords:
            keywords.append(phrase)
    return keywords


def parse_keyword_text(text: str) -> list[str]:
    """--keywords "baseball field; parking lot": phrases separated by semicolons."""
    return [k.strip() for k in text.split(";") if k.strip()]


@dataclass
class Query:
    text: str
    keywords: list[str] = field(default_factory=list)


def make_queries(sentences: list[str], keyword_texts: list[str] | None, use_keywords: bool = True
                 ) -> list[Query]:
    """Check sentences and pair each with its keywords (given, or split by the rule). Sentences and keywords
    follow the rules of class lines (options.check_typed_text): bounded, no control character, not invisible."""
    sentences = [s.strip() for s in sentences]
    if not sentences or any(not s for s in sentences):
        raise InputError("The search sentence is empty: type what to look for, e.g. "
                         "\"a baseball field next to a parking lot\".")
    if len(sentences) > MAX_QUERIES:
        raise InputError(f"{len(sentences)} sentences were given; search at most {MAX_QUERIES} at once.")
    seen: set[str] = set()
    for sentence in sentences:
        check_typed_text(sentence, "The search sentence", SENTENCE_MAX_CHARS)
        if same_name_key(sentence) in seen:  # the rule of class names: case, width, spacing, invisible marks
            raise InputError(f"The sentence {sentence!r} was given twice; give each sentence once (its hits "
                             "would be listed twice).")
        seen.add(same_name_key(sentence))
    keyword_texts = [k for k in (keyword_texts or [])]
    if keyword_texts and len(keyword_texts) != len(sentences):
        raise InputError(f"--keywords was given {len(keyword_texts)} time(s) for {len(sentences)} sentence(s): give "
                         "it once per sentence, in the same order, or leave it out to split the sentences "
                         "into keywords automatically.")
    queries = []
    for i, sentence in enumerate(sentences):
        if not use_keywords:
            keywords = []
        elif keyword_texts:
            check_typed_text(keyword_texts[i], "--keywords", SENTENCE_MAX_CHARS)
            keywords = parse_keyword_text(keyword_texts[i])
            for keyword in keywords:
                check_typed_text(keyword, "The keyword", SENTENCE_MAX_CHARS,
                                 f" of --keywords {keyword_texts[i][:60]!r}")
            if not keywords:
                raise InputError(f"--keywords {keyword_texts[i]!r} holds no keyword; separate phrases with ';', "
                                 "e.g. \"baseball field; parking lot\".")
        else:
            keywords = split_keywords(sentence)
        queries.append(Query(sentence, keywords))
    return queries


@dataclass
class SearchOptions:
    sentences: list[str] = field(default_factory=list)
    keywords: list[str] | None = None
    use_keywords: bool = True
    top: int = DEFAULT_TOP
    bbox: tuple[float, float, float, float] | None = None
    bbox_crs: str | None = None
    like: tuple[float, float] | None = None
    like_crs: str | None = None
    max_overlap: float = DEFAULT_MAX_OVERLAP


def validate_search_options(options: SearchOptions) -> list[Query]:
    if not 1 <= options.top <= 10000:
        raise InputError(f"--top must be between 1 and 10000; got {options.top}.")
    if not 0 < options.max_overlap <= 1:
        raise InputError(f"--max-overlap must be in (0, 1]; got {options.max_overlap}.")
    if options.like is None and options.like_crs:  # a forgotten --like would search by sentence without a word
        raise InputError(f"--like-crs {options.like_crs} says which CRS the --like point is in, and no --like was "
                         "given; add --like X Y, or leave --like-crs out.")
    if options.keywords and not options.sentences:  # keywords belong to sentences: ignored, they did nothing
        raise InputError("--keywords gives the keywords of the search sentences, and no sentence was given; type "
                         "the sentences the keywords belong to, or leave --keywords out.")
    if options.keywords and not options.use_keywords:
        raise InputError("--keywords names keywords and --no-keywords says to use none; give one of them.")
    if options.like is None:
        return make_queries(options.sentences, options.keywords, options.use_keywords)
    if not all(math.isfinite(value) for value in options.like):
        raise InputError(f"--like takes the example point as two numbers, X Y; got "
                         f"{' '.join(f'{value:g}' for value in options.like)}.")
    if options.sentences:
        return make_queries(options.sentences, options.keywords, options.use_keywords)
    return []
