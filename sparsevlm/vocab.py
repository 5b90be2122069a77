"""Words of a question the model's tokenizer does not know, each with the nearest word it does know.

A word-level tokenizer (the embedded model's) maps every word outside its vocabulary to <unk>, and the model
then answers a question it never read ("what color is ..." to a model that only knows `colour`). The hint
names such words before a run, with a suggestion by edit distance over the vocabulary. Subword tokenizers
(real LLaVA checkpoints) have no unknown words, so the list is empty for them.

    >>> unknown_words("What color is the ball?", tokenizer)
    [('color', 'colour'), ('ball', 'all')]
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+|[^\w\s]")
_SUBWORD_MARKS = ("\u2581", "\u0120", "##")  # SentencePiece, byte-level BPE, WordPiece prefixes


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), with adjacent transpositions counted as one
    edit (typed words often swap two letters: "shpae")."""
    prev2: list[int] | None = None
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if prev2 is not None and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def split_words(question: str, tokenizer=None) -> list[str]:
    """The question's words as the tokenizer sees them (its own normalizer and pre-tokenizer when it has
    them: the embedded model's lower-cases and splits punctuation off), else lower-cased word / punctuation
    runs."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.pre_tokenizer is not None:
        text = backend.normalizer.normalize_str(question) if backend.normalizer is not None else question
        return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    return _WORD.findall(question.lower())


def known_words(tokenizer) -> list[str]:
    """The vocabulary's words: special tokens dropped, subword markers stripped, duplicates removed."""
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    out = []
    for tok in tokenizer.get_vocab():
        if tok in special or (tok.startswith("<") and tok.endswith(">")):
            continue
        for mark in _SUBWORD_MARKS:
            if tok.startswith(mark):
                tok = tok[len(mark):]
        if tok:
            out.append(tok)
    return sorted(set(out))


def nearest_word(word: str, vocabulary: list[str]) -> str | None:
    """The known word closest to `word` by edit distance; ties go to the same kind (letters / digits), then the
    same first letter, the closer length, then alphabetical order. None for punctuation (no mark is a likely
    typo of another) or a vocabulary without words."""
    cands = [v for v in vocabulary if v[:1].isalnum()]
    if not word[:1].isalnum() or not cands:
        return None
    return min(cands, key=lambda v: (edit_distance(word, v), v.isalpha() != word.isalpha(), v[:1] != word[:1],
                                     abs(len(v) - len(word)), v))


def unknown_words(question: str, tokenizer) -> list[tuple[str, str | None]]:
    """(word, nearest known word) for every distinct word of `question` the tokenizer maps to its unknown
    token, in the order they appear. Empty when the tokenizer has no unknown token or knows every word."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    vocabulary: list[str] | None = None
    for w in split_words(question, tokenizer):
        if w in seen:
            continue
        seen.add(w)
        if unk in tokenizer(w, add_special_tokens=False)["input_ids"]:
            vocabulary = vocabulary if vocabulary is not None else known_words(tokenizer)
            out.append((w, nearest_word(w, vocabulary)))
    return out


def unknown_words_notice(unknown: list[tuple[str, str | None]]) -> str:
    """One line naming the unknown words and their suggestions ('' when there are none)."""
    if not unknown:
        return ""
    parts = [f"'{w}' (did you mean '{s}'?)" if s else f"'{w}'" for w, s in unknown]
    noun = "word" if len(unknown) == 1 else "words"
    return (f"notice: the model does not know the {noun} {', '.join(parts)}; it reads "
            f"{'it' if len(unknown) == 1 else 'them'} as <unk>, so the answer may be wrong")
