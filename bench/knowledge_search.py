"""Knowledge base search over 10,000 passages: what it adds to a turn, and how well it finds.

The corpus is the 10 labelled documents of tests/data/knowledge plus
synthetic filler documents (pseudo-words mixed with everyday shop words, so
that common terms match many passages) up to --passages passages, loaded
with `knowledge.add_document` as the API loads them.

Latency (PostgreSQL): each labelled question is searched as a /chat turn
does it (`knowledge.consult`'s search and the end of its read transaction),
--rounds times; p50 and p99 with the GIN index, then the same queries with
index and bitmap scans off (the baseline, measured in the same run).

Quality: recall@1 and recall@k (k = KNOWLEDGE_TOP_K) over the answerable
questions, the share answered in the `high` band with the right document
among the used passages, and the share of unanswerable questions that stay
`low`, on PostgreSQL and on SQLite (FTS5), each at its default threshold.

    python -m bench.knowledge_search [--passages 10000] [--rounds 20]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session
from tqdm import tqdm

import knowledge
from config import load_config
from database_utils import KnowledgePassage, make_engine, upgrade_database
from tests.postgres import admin_url, temporary_database

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "knowledge"
QUESTIONS = Path(__file__).resolve().parent / "knowledge_questions.json"
# A question is "selective" when its OR-ed terms match fewer than this share of the passages.
SELECTIVE = 0.02
# Words of everyday shop text, so filler passages compete with the labelled ones.
SHOP_WORDS = (
    "order orders delivery account payment card days return customer email store price product item items "
    "support service time week month plan code page team free cost number business help question data "
    "please open close change update send receive check online discount voucher parcel package"
).split()


def _filler(rng: random.Random, words: int) -> str:
    syllables = ["ka", "lo", "mi", "ra", "ten", "vo", "sul", "pe", "dri", "an", "gor", "li", "mus", "te", "zo"]
    out = []
    for _ in range(words):
        if rng.random() < 0.05:
            out.append(rng.choice(SHOP_WORDS))
        else:
            out.append("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return " ".join(out)


def load_corpus(session: Session, settings: dict, passages: int, progress: bool = True) -> int:
    summary = knowledge.load_folder(session, settings, CORPUS, progress=False)
    rng = random.Random(7)
    count = summary.passages
    with tqdm(total=passages, initial=count, desc="loading", unit="passage", disable=not progress) as bar:
        n = 0
        while count < passages:
            # About ten passages per filler document (1,200 characters each, overlapping by 200).
            document = knowledge.add_document(session, settings, f"Filler {n}", _filler(rng, 1_550), "text")
            count += document.passage_count
            bar.update(document.passage_count)
            n += 1
            if n % 50 == 0:
                session.commit()
    session.commit()
    return session.scalar(select(func.count()).select_from(KnowledgePassage))


def _turn_search(session: Session, backend: knowledge.DatabaseSearch, question: str, k: int) -> list[knowledge.Passage]:
    """What a turn adds: the search, then the end of its read transaction (as `consult` does)."""
    try:
        return backend.search(session, question, k)
    finally:
        session.rollback()


def latencies(session: Session, backend: knowledge.DatabaseSearch, questions: list[str], k: int, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per question, `rounds` samples each."""
    samples: dict[str, list[float]] = {question: [] for question in questions}
    for _ in range(rounds):
        for question in questions:
            started = time.perf_counter()
            _turn_search(session, backend, question, k)
            samples[question].append((time.perf_counter() - started) * 1000)
    return samples


MATCHES = text(
    "SELECT count(*) FROM knowledge_passages WHERE search_vector @@ "
    "CAST(translate(CAST(websearch_to_tsquery(CAST(:language AS regconfig), :query) AS text), '&!', '|') AS tsquery)"
)


def _row(name: str, indexed: list[float], baseline: list[float]) -> str:
    p50, p99, b50, b99 = statistics.median(indexed), _percentile(indexed, 99), statistics.median(baseline), _percentile(baseline, 99)
    return f"{name:<34}{len(indexed):>6}{p50:>9.2f}{p99:>9.2f}{b50:>10.2f}{b99:>10.2f}{b50 / p50:>7.1f}x{b99 / p99:>7.1f}x"


def _percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


def quality(session: Session, backend: knowledge.DatabaseSearch, settings: dict, labelled: list[dict], k: int) -> dict:
    threshold = backend.threshold(settings)
    answerable = [q for q in labelled if q["expected"]]
    unanswerable = [q for q in labelled if not q["expected"]]
    at1 = atk = high_right = 0
    misses = []
    for item in answerable:
        found = _turn_search(session, backend, item["question"], k)
        titles = [p.title for p in found]
        at1 += bool(titles) and titles[0] == item["expected"]
        atk += item["expected"] in titles
        used = [p.title for p in found if p.score >= threshold] if found and found[0].score >= threshold else []
        high_right += item["expected"] in used
        if item["expected"] not in titles:
            misses.append(item["question"])
    went_high = []
    for item in unanswerable:
        found = _turn_search(session, backend, item["question"], k)
        if found and found[0].score >= threshold:
            went_high.append(f"{item['question']} -> {found[0].title} ({found[0].score})")
    stayed_low = len(unanswerable) - len(went_high)
    return {
        "threshold": threshold,
        "recall@1": at1 / len(answerable),
        f"recall@{k}": atk / len(answerable),
        "high and cited": high_right / len(answerable),
        "unanswerable kept low": stayed_low / len(unanswerable),
        "answerable": len(answerable),
        "unanswerable": len(unanswerable),
        "misses": misses,
        "went high": went_high,
    }


def _print_quality(name: str, result: dict, k: int) -> None:
    print(f"\n{name} (threshold {result['threshold']}): {result['answerable']} answerable, {result['unanswerable']} unanswerable questions")
    print(f"  recall@1 {result['recall@1']:.0%}   recall@{k} {result[f'recall@{k}']:.0%}   "
          f"high band with the right passage used {result['high and cited']:.0%}   "
          f"unanswerable kept in the low band {result['unanswerable kept low']:.0%}")
    for question in result["misses"]:
        print(f"  not in the top {k}: {question}")
    for question in result["went high"]:
        print(f"  unanswerable but high: {question}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    labelled = json.loads(QUESTIONS.read_text())["questions"]
    questions = [item["question"] for item in labelled]
    base = load_config({})
    k = base["KNOWLEDGE_TOP_K"]

    with temporary_database(admin_url(), prefix="parley_bench") as url:
        upgrade_database(url)
        settings = {**base, "DATABASE_URL": url}
        # As the app makes it (custom plans); one connection, so that SET applies to every query.
        engine = make_engine(url, pool_size=1, max_overflow=0)
        backend = knowledge.DatabaseSearch(settings["KNOWLEDGE_LANGUAGE"])
        with Session(engine) as session:
            total = load_corpus(session, settings, args.passages)
            session.execute(text("ANALYZE knowledge_passages"))
            session.execute(text("ANALYZE knowledge_documents"))
            session.commit()
            matches = {q: session.scalar(MATCHES, {"language": settings["KNOWLEDGE_LANGUAGE"], "query": q}) for q in questions}
            latencies(session, backend, questions, k, 2)  # warm the cache
            indexed = latencies(session, backend, questions, k, args.rounds)
            # Committed: a SET in a transaction that is rolled back (as each search's is) is undone.
            session.execute(text("SET enable_indexscan = off"))
            session.execute(text("SET enable_bitmapscan = off"))
            session.commit()
            baseline = latencies(session, backend, questions, k, args.rounds)
            assert session.scalar(text("SHOW enable_bitmapscan")) == "off"
            session.execute(text("RESET ALL"))
            session.commit()
            pg_quality = quality(session, backend, settings, labelled, k)
            selective = min(questions, key=lambda q: (matches[q] == 0, -matches[q] if matches[q] < SELECTIVE * total else 0))
            plans = {
                f"{question!r} ({matches[question]} passages match)": "\n".join("      " + row for row in session.execute(
                    text("EXPLAIN " + str(knowledge.POSTGRES_SEARCH)),
                    {"language": settings["KNOWLEDGE_LANGUAGE"], "query": question, "k": k},
                ).scalars())
                for question in (questions[0], selective)
            }
            session.rollback()
        engine.dispose()

    with tempfile.TemporaryDirectory() as folder:
        sqlite_url = f"sqlite:///{folder}/bench.db"
        upgrade_database(sqlite_url)
        sqlite_settings = {**base, "DATABASE_URL": sqlite_url}
        engine = make_engine(sqlite_url)
        with Session(engine) as session:
            load_corpus(session, sqlite_settings, args.passages, progress=False)
            sqlite_latency = latencies(session, backend, questions, k, max(2, args.rounds // 4))
            sqlite_quality = quality(session, backend, sqlite_settings, labelled, k)
        engine.dispose()

    print(f"\nKnowledge search added to a turn, PostgreSQL, {total:,} passages, top {k}, "
          f"{len(questions)} questions x {args.rounds} rounds; ms, GIN index vs index and bitmap scans off")
    print(f"{'questions':<34}{'n':>6}{'p50':>9}{'p99':>9}{'off p50':>10}{'off p99':>10}{'ratio':>8}{'p99':>8}")
    groups = {
        "all": questions,
        f"selective (match < {SELECTIVE:.0%} of passages)": [q for q in questions if matches[q] < SELECTIVE * total],
        "broad (match more)": [q for q in questions if matches[q] >= SELECTIVE * total],
    }
    for name, group in groups.items():
        if group:
            print(_row(name, [t for q in group for t in indexed[q]], [t for q in group for t in baseline[q]]))
    counts = sorted(matches.values())
    print(f"passages matched per question: median {statistics.median(counts):.0f}, max {counts[-1]} of {total:,}")
    sqlite_all = [t for samples in sqlite_latency.values() for t in samples]
    print(f"SQLite FTS5, same corpus and questions: p50 {statistics.median(sqlite_all):.2f} ms, p99 {_percentile(sqlite_all, 99):.2f} ms")
    for name, plan in plans.items():
        print(f"\nPlan PostgreSQL picks for {name}:\n{plan}")
    _print_quality("PostgreSQL full-text", pg_quality, k)
    _print_quality("SQLite FTS5", sqlite_quality, k)


if __name__ == "__main__":
    main()
