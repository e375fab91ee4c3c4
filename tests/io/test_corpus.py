"""The bundled corpora: the Wikipedia markup cleaner on hand-made wikitext, and both corpora's splits."""

import importlib.util

import pytest

from ratplus.io.corpus import CORPORA, WIKI_VAL_EVERY, clean_wikitext, corpus_documents, wikipedia_articles

WIKITEXT = """{{Infobox person|name=Ada|image=Ada.jpg{{nested|x}}}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">Some source</ref> She wrote
the first ''published'' program.<ref>Other</ref><!-- a hidden comment -->
[[File:Ada.jpg|thumb|Portrait by [[Alfred Chalon]]]]
== Early life ==
* Born in [[London]] in 1815 &amp;nbsp;(see [http://example.org the page]).
{| class="wikitable"
| a cell || {{tmpl}}
|}
[[Category:Mathematicians]]
[[de:Ada Lovelace]]
"""


def test_clean_wikitext_keeps_prose_and_drops_markup():
    text = clean_wikitext(WIKITEXT)
    assert text.splitlines()[0] == "Ada Lovelace was an English mathematician. She wrote"
    assert "the first published program." in text
    assert "Early life" in text and "==" not in text
    assert "Born in London in 1815 (see the page)." in text
    for gone in (
        "Infobox",
        "source",
        "Other",
        "hidden",
        "Chalon",
        "Portrait",
        "cell",
        "Category",
        "de:",
        "[",
        "{",
        "'",
    ):
        assert gone not in text, gone


needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None, reason="the Wikipedia corpus ships in the gensim wheel"
)


@needs_gensim
def test_wikipedia_corpus_articles_and_split():
    arts = wikipedia_articles()
    assert len(arts) >= 80 and all(len(t) >= 500 for _, t in arts)
    assert arts[0][0] == "Anarchism" and arts[0][1].startswith("Anarchism is a political philosophy")
    assert not any("#REDIRECT" in t or "&amp;" in t or "<ref" in t for _, t in arts)
    # unbalanced markup in a few articles (e.g. literal braces in "ASCII") survives; the rest is clean
    assert sum(t.count("{{") + t.count("[[") for _, t in arts) <= 10
    train, val = corpus_documents("wikipedia", "train"), corpus_documents("wikipedia", "val")
    assert len(val) == len(arts) // WIKI_VAL_EVERY and len(train) + len(val) == len(arts)
    assert not set(train) & set(val)


def test_corpus_documents_names_and_errors():
    assert corpus_documents("shakespeare", "val") == corpus_documents(CORPORA[0], "val")
    with pytest.raises(ValueError, match="unknown bundled corpus 'gutenberg'; choose one of shakespeare, wikipedia"):
        corpus_documents("gutenberg")
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        corpus_documents("wikipedia", "test")
