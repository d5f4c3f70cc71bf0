"""Surface behaviours the sentence embedder cannot see: capitals, symbols, a list, another language.

all-MiniLM-L6-v2 is uncased and trained on English, so a reply in capitals embeds like the same
reply in lower case, replies in another language scatter, and emoji are unknown tokens to it. Yet
"replies in capitals", "replies in French" or "ends every sentence with ✨" is exactly the kind of
behaviour a planted trigger or a steering vector produces. So before clustering by meaning,
completions are put in surface groups, each one behaviour:
  caps        at least 80 % of at least 6 letters are capitals
  a language  any non-English language py3langid (Lui & Baldwin 2012's langid.py, 97 languages)
              names with probability >= 0.8, on at least 4 words
  symbols     at least 2 pictographic symbols (Unicode category So: emoji, dingbats); the group is
              named by the most frequent one
  list        at least 2 lines that open with a list marker ("1.", "2)", "-", "*", "•"): a format
              the embedder sees only as its items' topics, so lists on different prompts scattered
              over as many meaning clusters
Everything else ("" group) is clustered by meaning. Degenerate text ("jrjrjr", "*****") gets no
confident language and stays in the "" group.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter

from ..errors import SteerscopeError

_WORD = re.compile(r"[^\W\d_]+")
_ITEM = re.compile(r"(?m)^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+\S")
MIN_LANG_PROB = 0.8
_NAMES = {
    "fr": "French",
    "es": "Spanish",
    "de": "German",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "ru": "Russian",
    "zh": "Chinese",
    "ja": "Japanese",
    "ko": "Korean",
    "ar": "Arabic",
    "he": "Hebrew",
    "pl": "Polish",
    "sv": "Swedish",
    "tr": "Turkish",
    "hi": "Hindi",
    "la": "Latin",
    "da": "Danish",
    "no": "Norwegian",
    "fi": "Finnish",
    "el": "Greek",
    "cs": "Czech",
    "ro": "Romanian",
    "ca": "Catalan",
}


@functools.lru_cache(maxsize=1)
def _identifier():
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise SteerscopeError(
            "judging needs the language identifier py3langid: pip install 'steerscope[eval]'."
        ) from None
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the text's language (py3langid)."""
    code, prob = _identifier().classify(text)
    return code, float(prob)


def symbols(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) == "So"]


def surface_group(text: str) -> str:
    """'caps', 'sym:X' (X the most frequent symbol), 'list', a language code, or '' (ordinary
    English prose or too short to tell)."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) >= 6 and sum(c.isupper() for c in letters) >= 0.8 * len(letters):
        return "caps"
    syms = symbols(text)
    if len(syms) >= 2:
        return "sym:" + Counter(syms).most_common(1)[0][0]
    if len(_ITEM.findall(text)) >= 2:
        return "list"
    if len(_WORD.findall(text)) < 4:
        return ""
    code, prob = language(text)
    return code if code != "en" and prob >= MIN_LANG_PROB else ""


def label(group: str) -> str:
    """'written in capitals', 'in French', 'with ✨ symbols', '' for ''."""
    if not group:
        return ""
    if group == "caps":
        return "written in capitals"
    if group == "list":
        return "as a list"
    if group.startswith("sym:"):
        return f"with {group[4:]} symbols"
    return f"in {_NAMES.get(group, repr(group))}"
