"""The retrieval-quality datasets (benchmarks/datasets.py): the hand-written rephrasing files,
the splits, the Python documentation's section parser and filters, all without network; then
the two real sets, which need ``apt-get download`` and are skipped, with the reason, where it
cannot run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import datasets as ds
from benchmarks.datasets import Doc, QASet, Question, Rephrasing

FAQ_ANCHOR = re.compile(r"[a-z0-9][a-z0-9.\-]*")
PYTHON_SECTION = re.compile(r"(library|howto|tutorial|reference|using)/[\w.\-]+#[\w.\-]+")
ROW_COUNTS = {"debian_faq": (40, 60), "python_docs": (30, 40)}


def file_set(name: str) -> QASet:
    """A set built from the rephrasing file's own originals, to check the file without the
    Debian package."""
    rows = [json.loads(line) for line in (ds.DATA / f"{name}_rephrased.jsonl").open()]
    return QASet(
        name=name,
        documents=[Doc(r["document_id"], "text") for r in rows],
        questions=[Question(r["question"], r["document_id"]) for r in rows],
    )


def synthetic(docs: int = 20, per_doc: int = 3) -> QASet:
    return QASet(
        name="synthetic",
        documents=[Doc(f"d{i}", f"text {i}") for i in range(docs)],
        questions=[Question(f"q{i}.{j}", f"d{i}") for i in range(docs) for j in range(per_doc)],
    )


@pytest.mark.parametrize("name", sorted(ROW_COUNTS))
def test_rephrasing_file_parses_with_valid_anchors_and_new_wordings(name: str) -> None:
    rows = ds.read_rephrasings(file_set(name))
    low, high = ROW_COUNTS[name]
    assert low <= len(rows) <= high
    pattern = FAQ_ANCHOR if name == "debian_faq" else PYTHON_SECTION
    assert all(pattern.fullmatch(r.document_id) for r in rows)
    assert len({r.document_id for r in rows}) == len(rows)
    for r in rows:
        # a paraphrase, not the original with a few words moved or dropped
        original = set(re.findall(r"\w+", r.question.lower()))
        new = set(re.findall(r"\w+", r.rephrased.lower()))
        assert not new <= original, r


def test_read_rephrasings_names_the_line_of_a_bad_row(tmp_path: Path) -> None:
    qa = synthetic(docs=3, per_doc=1)
    good = {"document_id": "d0", "question": "q0.0", "rephrased": "another wording"}
    bad_rows = {
        "no document": {**good, "document_id": "nope"},
        "not the question": {**good, "question": "q1.0"},
        "words of the original": {**good, "rephrased": "Q0 0"},
        "exactly document_id": {**good, "extra": "x"},
        "non-blank": {**good, "rephrased": " "},
    }
    for why, row in bad_rows.items():
        path = tmp_path / "rows.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=rf"rows\.jsonl:3: .*{why}"):
            ds.read_rephrasings(qa, path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: not JSON"):
        ds.read_rephrasings(qa, path)


def test_by_document_never_puts_a_document_on_both_sides() -> None:
    qa = synthetic()
    for seed in range(5):
        train, test = ds.by_document(qa, seed=seed, test_fraction=0.3)
        train_docs = {q.document_id for q in train}
        test_docs = {q.document_id for q in test}
        assert not train_docs & test_docs
        assert len(test_docs) == 6
        assert sorted(q.question for q in train + test) == sorted(q.question for q in qa.questions)


def test_by_document_is_deterministic_for_a_seed() -> None:
    qa = synthetic()
    assert ds.by_document(qa, seed=7) == ds.by_document(qa, seed=7)
    assert ds.by_document(qa, seed=7).test != ds.by_document(qa, seed=8).test
    with pytest.raises(ValueError, match="test_fraction"):
        ds.by_document(qa, test_fraction=1.0)


def test_by_phrasing_tests_new_wordings_of_trained_documents() -> None:
    qa = synthetic(docs=4, per_doc=1)
    rows = [Rephrasing("d1", "q1.0", "a new way to ask"), Rephrasing("d3", "q3.0", "and another")]
    train, test = ds.by_phrasing(qa, rows)
    assert train == qa.questions
    assert test == [Question("a new way to ask", "d1"), Question("and another", "d3")]
    with pytest.raises(ValueError, match="no document 'd9'"):
        ds.by_phrasing(qa, [Rephrasing("d9", "q", "x")])


def test_qaset_refuses_a_question_without_its_document() -> None:
    with pytest.raises(ValueError, match="names no document"):
        QASet("bad", [Doc("a", "text")], [Question("q", "b")])
    with pytest.raises(ValueError, match="appears twice"):
        QASet("bad", [Doc("a", "x"), Doc("a", "y")], [])
    with pytest.raises(ValueError, match="no Q/A set 'nope'"):
        ds.load("nope")


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("Reading and writing compressed files", True),
        ("XML vulnerabilities", True),
        ("Member objects and __slots__", True),
        ("add_help", False),
        ("ZipFile Objects", False),
        ("Examples", False),
        ("os.path", False),
        ("Other functions", False),
    ],
)
def test_is_query_wants_two_natural_words(title: str, expected: bool) -> None:
    assert ds.is_query(title) is expected


PAGE = """<html><body><div class="body">
<section id="module-gzip">
<h1><code>gzip</code> — Support for <strong>gzip</strong> files<a class="headerlink">¶</a></h1>
<p>This module compresses files like <code><span>gzip.</span><span>open</span>()</code> does.</p>
<div class="toctree-wrapper"><ul><li>a contents entry</li></ul></div>
<dl><dt>gzip.<span>compress</span>(data)<a class="headerlink">¶</a></dt>
<dd><p>Compress.</p></dd></dl>
<section id="examples-of-usage">
<h2>1.2. Reading and writing compressed files<a class="headerlink">¶</a></h2>
<p>Open the file.</p><p>Read it.</p>
</section>
</section>
</div></body></html>"""


def test_read_sections_keeps_a_sections_own_text_without_its_heading(tmp_path: Path) -> None:
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "gzip.html").write_text(PAGE, encoding="utf-8")
    top, sub = ds.read_sections(tmp_path, "library")
    assert (top.id, top.page) == ("library/gzip#module-gzip", "library/gzip")
    assert top.title == "Support for gzip files"
    assert top.text.splitlines() == [
        "This module compresses files like gzip.open() does.",
        "gzip.compress(data) Compress.",
    ]
    assert sub.title == "Reading and writing compressed files"
    assert sub.text.splitlines() == ["Open the file.", "Read it."]
    assert "¶" not in top.text + sub.text


def test_select_sections_drops_short_long_repeated_and_api_only_headings() -> None:
    body = "x" * ds.MIN_SECTION_CHARS
    sections = [
        ds.Section("p#a", "p", "Querying the size of a terminal", body),
        ds.Section("p#b", "p", "Too short to answer", "x" * (ds.MIN_SECTION_CHARS - 1)),
        ds.Section("p#c", "p", "Far too long to keep", "x" * (ds.MAX_SECTION_CHARS + 1)),
        ds.Section("p#d", "p", "Security considerations", body),
        ds.Section("q#d", "q", "Security Considerations", body),
        ds.Section("p#e", "p", "ZipFile Objects", body),
    ]
    assert [s.id for s in ds.select_sections(sections)] == ["p#a"]


# --- the real sets: they need apt-get download (or the unpacked packages in benchmarks/.cache)


@pytest.fixture(scope="module")
def debian_faq() -> QASet:
    try:
        return ds.debian_faq()
    except ds.DatasetUnavailable as exc:
        pytest.skip(f"the Debian FAQ cannot be fetched here: {exc}")


@pytest.fixture(scope="module")
def python_docs() -> QASet:
    try:
        return ds.python_docs()
    except ds.DatasetUnavailable as exc:
        pytest.skip(f"the Python documentation cannot be fetched here: {exc}")


def test_debian_faq_answers_every_question_and_every_rephrasing(debian_faq: QASet) -> None:
    assert len(debian_faq.documents) == len(debian_faq.questions) >= 100
    assert all(q.question.endswith("?") for q in debian_faq.questions)
    train, test = ds.by_phrasing(debian_faq)  # validates every row against the set
    assert {q.document_id for q in test} <= {q.document_id for q in train}


def test_python_docs_is_a_seeded_sample_holding_the_rephrased_sections(
    python_docs: QASet,
) -> None:
    assert len(python_docs.documents) == ds.PYTHON_DOCS_SIZE
    assert ds.python_docs() == python_docs
    assert ds.python_docs(seed=1) != python_docs
    _, test = ds.by_phrasing(python_docs)
    assert len(test) >= 30
    for q in python_docs.questions:
        text = python_docs.document(q.document_id).text
        assert ds.MIN_SECTION_CHARS <= len(text) <= ds.MAX_SECTION_CHARS
        assert text.splitlines()[0].strip().lower() != q.question.lower()


def test_the_two_sets_differ_in_shape(debian_faq: QASet, python_docs: QASet) -> None:
    faq, docs = ds.summary(debian_faq), ds.summary(python_docs)
    assert faq["questions_ending_in_question_mark"] == faq["questions"]
    assert docs["questions_ending_in_question_mark"] < docs["questions"] / 10
    assert docs["question_words_mean"] * 2 < faq["question_words_mean"]
