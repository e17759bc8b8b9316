"""What enters the query list is prose: a dump's own namespaces (from its <siteinfo>) and image options
are not words, the unigram table's markup is dropped, and numbers keep their decimals."""

import bz2
import re
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import escape

import pyarrow.parquet as pq
import pytest
from conftest import write_dump, write_recipe

from queries.counting import OUTPUTS, count_part
from queries.dump import DumpPart, iter_page_bytes, parse_site, plan_parts, read_site, write_multistream
from queries.stage import QueriesStage
from queries.tables import read_unigram_table
from queries.wikitext import tokenize, wikitext_to_text
from wit_builder.errors import WitError
from wit_builder.recipe import load_recipe
from wit_builder.runner import LocalExecutor, run_stage
from wit_builder.workspace import Run

BG_HEADER = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="bg">
  <siteinfo>
    <sitename>Уикипедия</sitename>
    <dbname>bgwiki</dbname>
    <namespaces>
      <namespace key="-2" case="first-letter">Медия</namespace>
      <namespace key="0" case="first-letter" />
      <namespace key="1" case="first-letter">Беседа</namespace>
      <namespace key="6" case="first-letter">Файл</namespace>
      <namespace key="10" case="first-letter">Шаблон</namespace>
      <namespace key="14" case="first-letter">Категория</namespace>
      <namespace key="100" case="first-letter">Портал</namespace>
    </namespaces>
    <namespacealiases>
      <ns id="6">Картинка</ns>
    </namespacealiases>
  </siteinfo>
""".encode()
BG_BARE_HEADER = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="bg">
  <siteinfo>
    <sitename>Уикипедия</sitename>
  </siteinfo>
""".encode()
FOOTER = b"</mediawiki>\n"

# Prose, with every kind of link a Bulgarian article has: an article link, files under the name and
# under an alias with translated options (мини, дясно, 250px, 220пкс), a category, a portal, interwiki.
DOG = """'''Кучето''' е [[Бозайник|домашен бозайник]] с 4 крака.
[[Файл:Куче.jpg|мини|250px|Куче на поляна]]
[[Картинка:Котка.png|мини|дясно|220пкс|Котка до прозореца]]
[[файл:Вълк.svg|ляво|Сив вълк]]
Кучето лае по [[Луна|луната]].
[[Портал:Животни]]
[[Категория:Бозайници]] [[Категория:Домашни животни|Куче]]
[[en:Dog]]"""
DOG_PROSE = "Кучето е домашен бозайник с 4 крака. Кучето лае по луната."
MARKUP_WORDS = {"файл", "картинка", "категория", "портал", "мини", "дясно", "ляво", "250px", "220пкс",
                "jpg", "png", "svg", "куче", "поляна", "котка", "прозореца", "вълк", "сив", "бозайници",
                "домашни", "животни", "dog", "en"}


def words(text: str) -> Counter:
    return Counter(re.findall(r"\w+", text.lower()))


def page(title: str, text: str, ns: int | None = 0, pid: int = 1) -> bytes:
    ns_tag = f"    <ns>{ns}</ns>\n" if ns is not None else ""
    return (f"  <page>\n    <title>{escape(title)}</title>\n{ns_tag}    <id>{pid}</id>\n"
            f"    <revision>\n      <id>{pid}</id>\n"
            f"      <text xml:space=\"preserve\">{escape(text)}</text>\n    </revision>\n  </page>\n").encode()


def count(path: Path, tmp_path: Path, start: int = 0, end: int | None = None, tag: str = "") -> dict:
    outputs = {n: str(tmp_path / f"{tag}{n}.parquet") for n in OUTPUTS}
    info = count_part(str(path), start, end, outputs)
    read = {n: pq.read_table(outputs[n]).to_pylist() for n in OUTPUTS}
    return {
        "info": info,
        "unigrams": {r["token"]: r["count"] for r in read["unigrams"]},
        "bigrams": {(r["w1"], r["w2"]): r["count"] for r in read["bigrams"]},
        "titles": [r["title"] for r in read["titles"]],
        "links": {r["target"]: r["count"] for r in read["links"]},
    }


def test_bulgarian_namespaces_and_image_options_from_siteinfo(tmp_path):
    dump = tmp_path / "bgwiki.xml.bz2"
    body = page("Куче", DOG, pid=1) + page("Категория:Бозайници", "Бозайниците имат козина.", ns=14, pid=2)
    dump.write_bytes(bz2.compress(BG_HEADER + body + FOOTER))

    site = read_site(str(dump))
    assert site.lang == "bg"
    assert site.namespaces["категория"] == 14 and site.namespaces["картинка"] == 6  # the alias

    got = count(dump, tmp_path)
    assert got["unigrams"] == words(DOG_PROSE)  # the prose, all of it and nothing else
    assert not MARKUP_WORDS & set(got["unigrams"])
    assert got["titles"] == ["Куче"]  # the category page is not an article
    assert got["links"] == {"Бозайник": 1, "Луна": 1}


def test_translated_image_options_without_siteinfo_namespaces(tmp_path):
    """No <namespaces>: `Файл:` is unknown, so the image link is told by its shape (`250px`, a file
    name) or by an option of the dump's language (`мини` on a bg dump)."""
    text = ("Реката тече на юг.\n[[Файл:Река.jpg|мини|Река]]\n[[Снимка:Изглед|мини|Изглед към морето]]\n"
            "[[Фото:Мост|250px|Стар мост]]\n[[Междузвездни войни: Епизод I|Първият филм]] излиза през 1999.")
    dump = tmp_path / "bare.xml"
    dump.write_bytes(BG_BARE_HEADER + page("Река", text) + FOOTER)
    got = count(dump, tmp_path)
    assert got["unigrams"] == words("Реката тече на юг. Първият филм излиза през 1999.")
    assert got["links"] == {"Междузвездни войни: Епизод I": 1}  # a title with a colon stays a link


def test_pages_without_ns_tags_take_the_namespace_from_the_title(tmp_path):
    pages = (page("Куче", "Кучето лае.", ns=None, pid=1)
             + page("Категория:Бозайници", "категорийни думи", ns=None, pid=2)
             + page("Беседа:Куче", "беседни думи", ns=None, pid=3)
             + page("Talk:Куче", "английска беседа", ns=None, pid=4)  # canonical names work everywhere
             + page("Междузвездни войни: Епизод I", "Филмът излиза.", ns=None, pid=5))
    dump = tmp_path / "old.xml.bz2"
    dump.write_bytes(bz2.compress(BG_HEADER + pages + FOOTER))
    got = count(dump, tmp_path)
    assert got["info"]["pages"] == 5 and got["info"]["articles"] == 2
    assert got["titles"] == ["Куче", "Междузвездни войни: Епизод I"]
    assert got["unigrams"] == words("Кучето лае. Филмът излиза.")


def test_an_english_dump_without_siteinfo_still_counts(tmp_path):
    dump = tmp_path / "plain.xml"
    dump.write_bytes(b"<mediawiki>\n" + page("Dog", "A dog [[bark]]s. [[Category:Dogs]]", ns=None)
                     + page("Talk:Dog", "talk words", ns=None, pid=2) + FOOTER)
    got = count(dump, tmp_path)
    assert got["titles"] == ["Dog"]
    assert got["unigrams"] == {"a": 1, "dog": 1, "barks": 1}
    assert got["links"] == {"Bark": 1}


def test_every_partition_of_a_multistream_dump_reads_the_siteinfo(tmp_path):
    pages = b"".join(page(f"Статия {i}", f"Текст номер {i}. [[Категория:Тест]] [[Файл:А{i}.jpg|мини|Надпис]]",
                          pid=i + 1) for i in range(12))
    dump = tmp_path / "bgwiki-multistream.xml.bz2"
    write_multistream(pages, BG_HEADER, FOOTER, dump, tmp_path / "bgwiki-multistream-index.txt.bz2",
                      pages_per_stream=2)
    parts = plan_parts(str(dump), 1)
    assert len(parts) >= 4 and parts[1].start > 0  # later parts hold no <siteinfo> of their own
    total: Counter = Counter()
    for i, p in enumerate(parts):
        total.update(count(dump, tmp_path, p.start, p.end, tag=f"p{i}.")["unigrams"])
    assert total == words(" ".join(f"Текст номер {i}." for i in range(12)))
    assert "категория" not in total and "мини" not in total


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_dump_is_refused_by_name(tmp_path, encoding, compress):
    xml = (BG_HEADER + page("Куче", "Кучето лае.") + FOOTER).decode()
    text = '<?xml version="1.0" encoding="UTF-16"?>\n' + xml
    data = text.encode(encoding)
    dump = tmp_path / ("d.xml.bz2" if compress else "d.xml")
    dump.write_bytes(bz2.compress(data) if compress else data)
    with pytest.raises(WitError, match="encoded as UTF-16") as e:
        count(dump, tmp_path)
    assert str(dump) in str(e.value) and "no <page>" not in str(e.value)
    with pytest.raises(WitError, match="encoded as UTF-16"):
        list(iter_page_bytes(DumpPart(str(dump))))


def test_a_dump_declared_in_another_encoding_is_refused(tmp_path):
    dump = tmp_path / "latin1.xml"
    dump.write_bytes(b'<?xml version="1.0" encoding="ISO-8859-1"?>\n<mediawiki>\n'
                     + page("Cafe", "caf\u00e9").replace("é".encode(), b"\xe9") + FOOTER)
    with pytest.raises(WitError, match="encoded as ISO-8859-1"):
        count(dump, tmp_path)


def test_parse_site_reads_repeated_keys_as_aliases():
    site = parse_site(b'<mediawiki xml:lang="ru"><siteinfo><namespaces>'
                      b'<namespace key="6">\xd0\xa4\xd0\xb0\xd0\xb9\xd0\xbb</namespace>'  # Файл
                      b'<namespace key="6">\xd0\x98\xd0\xb7\xd0\xbe\xd0\xb1\xd1\x80\xd0\xb0\xd0\xb6\xd0\xb5'
                      b'\xd0\xbd\xd0\xb8\xd0\xb5</namespace>'  # Изображение
                      b'</namespaces></siteinfo>')
    assert site.lang == "ru"
    assert site.namespaces["файл"] == site.namespaces["изображение"] == 6
    assert site.title("Изображение:Кот.jpg") is None and site.title("Кот") == "Кот"
    assert site.is_image_option("миниатюра") and site.is_image_option("300пкс")
    assert not parse_site(b"<mediawiki>").is_image_option("миниатюра")  # English only without a language


def test_unigram_table_unescapes_entities_and_drops_markup(tmp_path):
    table = tmp_path / "counts.txt"
    table.write_text("\n".join([
        "the;1000", "r&amp;b;500", "r&b;20", "at&amp;t;130", "u.s;300", "don't;100", "covid-19;120",
        "steins;gate;110", "67.5;105",
        # markup, as in the real table
        "lt;br&gt;400", "lt;/ref&gt;390", "colspan=9;300", 'scope="row;300', 'align="right"|100.00;290',
        "t]he;250", 'billboard"s;240', "formula_1;200", "codice_2;190", "250px;200",
        "color:#e9e9e9;text;150", "background:#dcdcdc;149", "left;vertical;120", "width:50;118",
        "category:20th;150", "quot;the;100", "amp;c;100",
    ]) + "\n")
    assert read_unigram_table(table) == {
        "the": 1000, "r&b": 520, "at&t": 130, "u.s": 300, "don't": 100, "covid-19": 120,
        "steins;gate": 110, "67.5": 105,
    }

    run = Run(load_recipe(write_recipe(tmp_path, unigram_counts=str(table), min_count=100)))
    run_stage(QueriesStage(), run, LocalExecutor(1))
    rows = pq.read_table(run.dir / "queries" / "queries.parquet").to_pylist()
    assert [(r["query"], r["count"]) for r in rows] == [
        ("the", 1000), ("r&b", 520), ("u.s", 300), ("at&t", 130), ("covid-19", 120), ("steins;gate", 110),
        ("67.5", 105), ("don't", 100)]


def test_decimals_stay_one_token_and_superscripts_join_their_word(tmp_path):
    assert tokenize("67.5 x 47.5 cm, 1,000 people; 67,5 x 47,5 см. U.S. in 1990.") == [
        "67.5", "x", "47.5", "cm", ",", "1,000", "people", ";", "67,5", "x", "47,5", "см", ".",
        "u", ".", "s", ".", "in", "1990", "."]
    text = ("The canvas measures 67.5 x 47.5 cm. The tank holds 1,000 m<sup>3</sup> of water, "
            "H<sub>2</sub>O.\nLine one&lt;br&gt;line two.")
    assert wikitext_to_text(text).split("\n")[0] == (
        "The canvas measures 67.5 x 47.5 cm. The tank holds 1,000 m3 of water, H2O.")
    dump = write_dump(tmp_path / "d.xml.bz2", [("Canvas", text)])
    got = count(dump, tmp_path)
    uni, bi = got["unigrams"], got["bigrams"]
    assert uni["67.5"] == uni["47.5"] == uni["1,000"] == uni["m3"] == uni["h2o"] == 1
    assert not {"5", "67", "47", "000", "3", "2", "br", "lt", "gt"} & set(uni)
    assert bi[("67.5", "x")] == bi[("x", "47.5")] == bi[("47.5", "cm")] == 1
    assert ("5", "x") not in bi and bi[("1,000", "m3")] == 1 and bi[("one", "line")] == 1


def test_file_link_whose_caption_has_brackets_is_dropped_whole():
    """`[above]` in a caption stops the link pattern; the link still goes, up to its own `]]`."""
    text = ("[[File:Congress.jpg|thumb|upright=1.2|Front row [above] from [[Joseph Stalin|Stalin]]'s "
            "party]] The pigs walk upright. [[Image:C4.png|thumb|right|Bicyclo[1.1.0]butane]] End.")
    links: list[str] = []
    assert words(wikitext_to_text(text, links)) == words("The pigs walk upright. End.")
    assert links == ["Joseph Stalin"]  # a caption's article links still count as inlinks, as before
