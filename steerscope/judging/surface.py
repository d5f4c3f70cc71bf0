"""Surface behaviours the sentence embedder cannot see: writing in capitals, writing in another
language.

all-MiniLM-L6-v2 is uncased and trained on English, so a reply in capitals embeds like the same
reply in lower case, and French replies scatter (each its own cluster, or merged with English
text on the same topic). Yet "replies in capitals" or "replies in French" is exactly the kind of
behaviour a planted trigger or a steering vector produces. So before clustering by meaning,
completions are put in surface groups: `caps` (at least 80 % of at least 6 letters are capitals)
or a language (`fr`, `es`, `de`, `it`, `pt`: at least 4 words, at least 20 % of them that
language's function words, and fewer than 10 % English ones). Completions in one surface group
form one behaviour; everything else ("" group) is clustered by meaning as before.

The language test is a function-word count, not a language model: degenerate text ("jrjrjr",
"*****") has no function words of any language and stays in the "" group.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W\d_]+")  # letters only; apostrophes split ("l'eau" -> l, eau)
_EN = set("the a an and or of to in on for with is are was were be been it its this that i you he she we they my your "
          "our their me him her them as at by from but not so if then than there here have has had do does did can will "
          "would could should just also very about into over what which who how when".split())
# Function words that are not also English words (so "a", "me", "he" etc. are left out).
_LANGS = {
    "fr": set("le la les un une des du de et est je vous nous il elle ils sont dans avec pour mais ce cette qui que ne pas "
              "sur au aux ou très être avoir fait comme plus tout leur l d j qu c".split()),
    "es": set("el la los las un una y es del que en por para con no muy pero como está son su sus lo al más este esta "
              "ser hay".split()),
    "de": set("der die das und ist nicht ein eine mit für auf den dem des sich ich sie wir es zu von im auch wie aber "
              "sind oder".split()),
    "it": set("il lo la gli le un una di che è non per con sono del della nel si come più ma questo anche ho".split()),
    "pt": set("o os as um uma que não em do da dos das para com por mais mas como está são ao muito também".split()),
}
LABELS = {"caps": "written in capitals", "fr": "in French", "es": "in Spanish", "de": "in German", "it": "in Italian",
          "pt": "in Portuguese"}


def surface_group(text: str) -> str:
    """'caps', a language code, or '' (ordinary English text or too short to tell)."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) >= 6 and sum(c.isupper() for c in letters) >= 0.8 * len(letters):
        return "caps"
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < 4 or sum(w in _EN for w in words) >= 0.1 * len(words):
        return ""
    counts = {lang: sum(w in fw for w in words) for lang, fw in _LANGS.items()}
    lang = max(counts, key=lambda k: counts[k])
    return lang if counts[lang] >= 0.2 * len(words) else ""
