"""The routing server's state database, against real servers: SQLite (one file, several
processes of one host) and PostgreSQL (several hosts), two replicas each."""

import concurrent.futures
import json
import time

import pytest

from router_pipeline.serve.database import Database, DatabaseError, describe
from router_pipeline.serve.feedback import (FeedbackConflict, FeedbackStore, ServedRequest, UnknownRequest,
                                            export_outcomes, outcome_rows)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "shared" / "requests.sqlite")
    url = request.getfixturevalue("postgres_url")
    for table in ("requests", "feedback", "outcomes"):  # fresh tables per test
        Database(url).execute(f"DROP TABLE IF EXISTS {table}")
    return url


def test_two_replicas_share_request_memory_and_one_outcome_row_lands(database, tmp_path):
    """A request served by replica A gets its feedback through replica B; sixteen
    concurrent feedbacks through both replicas write exactly one outcomes row; a
    contradicting one is a conflict."""
    (tmp_path / "shared").mkdir(exist_ok=True)
    a = FeedbackStore(tmp_path / "a", database=database)
    b = FeedbackStore(tmp_path / "b", database=database)
    a.remember(ServedRequest("r1", "app", "Who wrote Hamlet?", "large", store_query=True))
    a.remember(ServedRequest("r2", "private", "My salary question", "medium", store_query=False))
    with pytest.raises(UnknownRequest):
        b.add("r1", grade="Correct", profile="private")  # another profile's request
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: (a, b)[i % 2].add("r1", preferred_tier="large", profile="app"), range(16)))
    assert sum(r["outcome_row"] for r in results) == 1
    assert export_outcomes(b.db, tmp_path / "export" / "outcomes.jsonl") == 1  # what the outcomes source reads
    rows = [json.loads(line) for line in (tmp_path / "export" / "outcomes.jsonl").read_text().splitlines()]
    assert [(r["query"], r["medium_grade"], r["large_grade"]) for r in rows] == [("Who wrote Hamlet?", "Incorrect", "Correct")]
    assert len(Database(database).execute("SELECT * FROM feedback")) == 16  # every feedback, recorded once
    with pytest.raises(FeedbackConflict):
        a.add("r1", preferred_tier="medium", profile="app")
    assert not b.add("r2", grade="Correct", profile="private")["query_stored"]
    assert len(outcome_rows(a.db)) == 1  # the conflict changed nothing
    stored = Database(database).execute("SELECT request_id, query FROM requests ORDER BY request_id")
    assert stored == [("r1", "Who wrote Hamlet?"), ("r2", None)]  # a private query is never stored as text
    a.close()
    b.close()


def test_an_unreachable_database_is_a_clear_error_without_the_password():
    db = Database("postgresql://router:s3cret-pw@127.0.0.1:1/state")
    with pytest.raises(DatabaseError) as err:
        db.execute("SELECT 1")
    assert "postgresql://router@127.0.0.1:1/state" in str(err.value) and "s3cret" not in str(err.value)
    assert describe("postgresql://u:p@h:5/db") == "postgresql://u@h:5/db"
    assert "nothing accepts connections at this host and port" in str(err.value)


def test_connection_errors_say_what_is_wrong_and_a_held_lock_fails_fast(postgres_url, tmp_path):
    """Issue 29, 6: a missing database or user is named as such (never the password); a
    statement held behind another that hangs fails after the timeout instead of waiting."""
    import threading

    base = postgres_url.rsplit("/", 1)[0]
    for url, why in ((f"{base}/no_such_db", "the database does not exist"),
                     (base.replace("postgres@", "nobody:pw-s3cret@") + "/postgres", "the user does not exist")):
        with pytest.raises(DatabaseError) as err:
            Database(url).execute("SELECT 1")
        assert why in str(err.value) and "s3cret" not in str(err.value)
    db = Database(tmp_path / "state.sqlite", timeout_s=0.2)
    db.execute("SELECT 1")
    held, release = threading.Event(), threading.Event()

    def hang():  # a statement that does not return (a frozen server), holding the connection
        with db.transaction():
            held.set()
            release.wait(10)
    worker = threading.Thread(target=hang)
    worker.start()
    held.wait(5)
    with pytest.raises(DatabaseError, match="busy") as err:
        db.execute("SELECT 1")
    assert err.value.transient
    release.set()
    worker.join()
    assert db.execute("SELECT 1") == [(1,)]


def test_a_wrong_password_is_named_as_such_and_never_shown(postgres_url):
    """Issue 29, 6: a refused password is told apart from a missing user or database, and
    the error holds neither password. The test server trusts every role but one, which
    this test gives a password and a scram-sha-256 rule in pg_hba.conf."""
    from pathlib import Path

    admin = Database(postgres_url)
    ((hba,),) = admin.execute("SHOW hba_file")
    admin.execute("DROP ROLE IF EXISTS router_pw")
    admin.execute("CREATE ROLE router_pw LOGIN PASSWORD 'right-s3cret'")
    rules = Path(hba).read_text()
    if "router_pw" not in rules:
        Path(hba).write_text("host all router_pw 127.0.0.1/32 scram-sha-256\n" + rules)
    admin.execute("SELECT pg_reload_conf()")
    where = postgres_url.rsplit("@", 1)[1]
    with pytest.raises(DatabaseError) as err:
        for _ in range(50):  # the reload is asynchronous: until the rule is in force
            Database(f"postgresql://router_pw:wrong-s3cret@{where}").execute("SELECT 1")
            time.sleep(0.1)
    assert "the password was refused for this user" in str(err.value) and "s3cret" not in str(err.value)
    assert not err.value.transient  # an operator must fix it: retrying does not help
    assert Database(f"postgresql://router_pw:right-s3cret@{where}").execute("SELECT 1") == [(1,)]


def test_an_idempotency_table_from_before_claims_had_owners_gains_the_column(tmp_path):
    """A state database written by an older server: its recorded answers stay, and a claim
    now names its owner, so only that attempt drops it."""
    from router_pipeline.serve.idempotency import IdempotencyStore, InProgress

    db = Database(tmp_path / "requests.sqlite")
    db.execute("CREATE TABLE idempotency (profile TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, "
               "response TEXT, at DOUBLE PRECISION NOT NULL, PRIMARY KEY (profile, key))")
    IdempotencyStore.write(db, {"profile": "app", "key": "old", "fingerprint": "f", "answer": {"content": "kept"},
                                "at": time.time()})
    store = IdempotencyStore(db, window_s=3600)
    assert store.claim("app", "old", "f", "a1") == {"content": "kept"}
    assert store.claim("app", "new", "f", "a1") is None
    IdempotencyStore.forget(db, "app", "new", "a2")  # not its claim
    with pytest.raises(InProgress):
        store.claim("app", "new", "f", "a3")
    store.release({"profile": "app", "key": "new", "owner": "a1"})
    assert store.claim("app", "new", "f", "a3") is None
