"""Map a free-text (chat) answer to exactly one label of a known label set, or to ``None`` (unanswered).

Standard library only: this file is shipped as Hub remote code with the inference pipeline and must not
import other project files.

Rules
-----
1. An answer equal to a label (ignoring surrounding whitespace and case) is that label.
2. Text and labels are tokenized the same way: Unicode NFKC, every dash variant read as ``-``, tokens are
   runs of letters/digits (an apostrophe inside a word is dropped: ``cell's`` = ``cells``); ``+`` stays
   attached to its token (``CD14+``), and so does a token-final ``-`` (``CD25-``, a negative marker);
   any other punctuation, an inner hyphen, ``/``, ``_`` or whitespace separates tokens, so
   ``Pre-endocrine`` = ``pre endocrine`` and ``NK/T Cell`` = ``NK T cell``.
3. Tokens are lower-cased and singularized: ``EPs`` -> ``ep`` (an upper-case acronym plus a lower-case
   ``s``), ``-ies`` -> ``-y``, and a final ``s`` is dropped from words longer than 3 letters that do not end
   in ``ss``, ``us`` or ``is`` (``Monocytes`` -> ``monocyte``, ``cells`` -> ``cell``; ``ORS`` and ``Isthmus``
   are kept).
4. If the label set stays distinguishable without them, marker signs are dropped and letters/digits are
   split (``CD14+`` -> ``cd 14``), so ``CD4+ T cells`` matches the label ``CD4 T cells``. Otherwise (e.g.
   labels that differ only by ``+``/``-``) the signs are kept.
5. A label is *mentioned* when its token sequence occurs contiguously in the text's tokens. A mention
   that lies inside a longer mention of another label is ignored (``T cell`` inside ``CD4 T cell``).
6. Exactly one distinct label mentioned (any number of times) -> that label. Two or more -> ``None``
   (ambiguous). None -> fall back to joined spelling (``Tcells`` = ``T cells``, ``preendocrine``), matched on
   whole tokens only, with the same rules; still nothing -> ``None``.

Labels that are identical under these rules (``B cell`` and ``B cells``) are rejected with a ``ValueError``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["AnswerExtractor", "extract_label"]

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe63\uff0d"), "-")
# letters/digits, then '+'s, or one '-' that ends the word (followed by a separator or the end)
_TOKEN = re.compile(r"[^\W_]+(?:\++|-(?=[\s/,;:.!?()\[\]{}'\"]|$))?")
_ACRONYM_PLURAL = re.compile(r"[A-Z0-9]*[A-Z][A-Z0-9]*s")
_ALNUM_PARTS = re.compile(r"[^\W\d_]+|\d+")
_APOSTROPHE = re.compile(r"(?<=[^\W_])['\u2019](?=[^\W_])")

Key = tuple[str, ...]


def _singular(word: str) -> str:
    if len(word) >= 3 and _ACRONYM_PLURAL.fullmatch(word):
        return word[:-1].lower()
    word = word.lower()
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _strict_tokens(text: str) -> list[str]:
    text = _APOSTROPHE.sub("", unicodedata.normalize("NFKC", text).translate(_DASHES))
    tokens = []
    for match in _TOKEN.finditer(text):
        token = match.group()
        core = token.rstrip("+-")
        tokens.append(_singular(core) + token[len(core) :])
    return tokens


def _relaxed_tokens(strict: list[str]) -> list[str]:
    return [part for token in strict for part in _ALNUM_PARTS.findall(token.rstrip("+-"))]


def _distinct_labels(spans: list[tuple[int, int, str]]) -> set[str]:
    """Labels of the mentions that are not strictly inside a longer mention."""
    kept = set()
    for start, end, label in spans:
        inside = any(
            s <= start and end <= e and (e - s) > (end - start) for s, e, other in spans if other != label
        )
        if not inside:
            kept.add(label)
    return kept


class AnswerExtractor:
    """Callable that maps free text to one label of ``labels`` or ``None``; see the module rules.

    Parameters
    ----------
    labels : sequence of str
        The known label set (e.g. a dataset's cell types). Order does not matter; duplicates are ignored.

    Examples
    --------
    >>> extract = AnswerExtractor(["T cell", "CD4 T cell", "B cell"])
    >>> extract("This looks like a CD4+ T-cell to me.")
    'CD4 T cell'
    >>> extract("Either a B cell or a T cell.") is None
    True
    """

    def __init__(self, labels: Sequence[str]) -> None:
        if isinstance(labels, str):
            raise ValueError(
                "`labels` must be a sequence of label strings, not one string; wrap it in a list."
            )
        self.labels = list(dict.fromkeys(labels))
        if not self.labels:
            raise ValueError("`labels` is empty; pass the dataset's label set (e.g. its cell types).")
        strict: dict[str, Key] = {}
        for label in self.labels:
            if not isinstance(label, str):
                raise ValueError(f"Labels must be strings, got {label!r}; convert them with str().")
            key = tuple(_strict_tokens(label))
            if not key:
                raise ValueError(f"Label {label!r} has no letters or digits; give it a readable name.")
            strict[label] = key
        self._check_distinct(strict, "case, plural and punctuation")
        relaxed = {label: tuple(_relaxed_tokens(list(key))) for label, key in strict.items()}
        self.relaxed = len(set(relaxed.values())) == len(relaxed)
        keys = relaxed if self.relaxed else strict
        self._index: dict[Key, str] = {key: label for label, key in keys.items()}
        self._max_tokens = max(len(key) for key in self._index)
        compact = {"".join(key): label for key, label in self._index.items()}
        self._compact = compact if len(compact) == len(self._index) else {}
        self._max_chars = max((len(c) for c in self._compact), default=0)
        self._exact = {label.strip().lower(): label for label in self.labels}

    @staticmethod
    def _check_distinct(keys: dict[str, Key], what: str) -> None:
        seen: dict[Key, str] = {}
        for label, key in keys.items():
            if key in seen:
                raise ValueError(
                    f"Labels {seen[key]!r} and {label!r} differ only by {what}, so answers cannot tell them "
                    "apart; merge or rename them."
                )
            seen[key] = label

    def tokens(self, text: str) -> list[str]:
        """Return the normalized tokens of ``text`` used for matching (rules 2-4)."""
        strict = _strict_tokens(text)
        return _relaxed_tokens(strict) if self.relaxed else strict

    def __call__(self, text: str | None) -> str | None:
        """Return the one label mentioned in ``text``, or ``None`` when none or several are."""
        if text is None:
            return None
        if not isinstance(text, str):
            raise ValueError(f"`text` must be a string or None, got {type(text).__name__}.")
        exact = self._exact.get(text.strip().lower())
        if exact is not None:
            return exact
        tokens = self.tokens(text)
        spans = []
        for i in range(len(tokens)):
            for j in range(i + 1, min(i + self._max_tokens, len(tokens)) + 1):
                label = self._index.get(tuple(tokens[i:j]))
                if label is not None:
                    spans.append((i, j, label))
        if not spans and self._compact:
            for i in range(len(tokens)):
                joined = ""
                for j in range(i, len(tokens)):
                    joined += tokens[j]
                    if len(joined) > self._max_chars:
                        break
                    label = self._compact.get(joined)
                    if label is not None:
                        spans.append((i, j + 1, label))
        found = _distinct_labels(spans)
        return found.pop() if len(found) == 1 else None


@lru_cache(maxsize=64)
def _extractor(labels: tuple[str, ...]) -> AnswerExtractor:
    return AnswerExtractor(labels)


def extract_label(text: str | None, labels: Sequence[str]) -> str | None:
    """Map free text to exactly one label of ``labels``, or ``None`` (unanswered: none or ambiguous).

    Parameters
    ----------
    text : str or None
        A model answer, e.g. ``"The cell type you are looking for is CD14+ monocyte."``.
    labels : sequence of str
        The known label set.

    Returns
    -------
    str or None
        The label exactly as spelled in ``labels``, or ``None``.

    Examples
    --------
    >>> extract_label("These look like ngn3-low EPs.", ["Ngn3 low EP", "Ngn3 high EP"])
    'Ngn3 low EP'
    """
    if isinstance(labels, str):
        raise ValueError("`labels` must be a sequence of label strings, not one string; wrap it in a list.")
    return _extractor(tuple(labels))(text)
