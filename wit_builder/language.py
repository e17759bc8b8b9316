"""Offline language identification (py3langid's model, shipped with it) and stop words by language
(stopwordsiso, ISO 639-1 codes): shared by the filter's language rule and the report's gallery."""

from __future__ import annotations

import functools


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, confidence in 0..1) of a text."""
    lang, confidence = _identifier().classify(text)
    return lang, float(confidence)


@functools.cache
def stop_words(lang: str) -> frozenset[str]:
    """The language's stop words; English's where stopwordsiso has no list for it."""
    import stopwordsiso

    return frozenset(stopwordsiso.stopwords(lang if stopwordsiso.has_lang(lang) else "en"))
