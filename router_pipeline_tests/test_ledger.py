"""The budget ledger is money state in the state database: it survives a killed writer,
fails closed, and takes over an older version's ledger file without losing its spend."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from router_pipeline.serve.database import Database
from router_pipeline.serve.ledger import BudgetLedger, LedgerError


def _ledger(tmp_path, name="budget", period="total", legacy=None) -> BudgetLedger:
    return BudgetLedger(name, period, legacy=legacy).bind(Database(tmp_path / "state.sqlite"))


@pytest.mark.parametrize("content,problem", [
    (b"", "is empty"),
    (b"  \n", "is empty"),
    (b"[]", "found list"),
    (b"7.5", "found float"),
    (b'{"total": "abc"}', "invalid amounts"),
    (b'{"total": NaN}', "invalid amounts"),
    (b'{"total": -3.0}', "invalid amounts"),
    (b'{"total": true}', "invalid amounts"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"total": 5.13', "not valid JSON"),
])
def test_a_corrupt_older_ledger_file_stops_spending_and_is_left_alone(tmp_path, content, problem):
    path = tmp_path / "budget.json"
    path.write_bytes(content)
    ledger = _ledger(tmp_path, "budget.json", legacy=path)
    with pytest.raises(LedgerError, match=problem) as err:
        ledger.spent()
    assert str(path) in str(err.value) and err.value.file == "budget.json"
    with pytest.raises(LedgerError, match=problem):
        ledger.settle(None, 0.5)
    assert path.read_bytes() == content  # never reset or rewritten
    path.write_text('{"total": 1.25}')  # a person restores it: its spend is taken over, once
    assert ledger.spent() == 1.25 and ledger.settle(None, 0.5) == 1.75
    assert _ledger(tmp_path, "budget.json", legacy=path).spent() == 1.75  # not taken over twice


@pytest.mark.parametrize("amount", [float("nan"), float("inf"), -0.01, True, "1"])
def test_invalid_spend_is_refused(tmp_path, amount):
    ledger = _ledger(tmp_path)
    ledger.settle(None, 1.0)
    with pytest.raises(LedgerError, match="finite number >= 0"):
        ledger.settle(None, amount)
    assert ledger.spent() == 1.0


def test_a_writer_killed_mid_update_never_loses_the_previous_total(tmp_path):
    writer = textwrap.dedent(f"""
        from router_pipeline.serve.database import Database
        from router_pipeline.serve.ledger import BudgetLedger
        ledger = BudgetLedger("budget", "total").bind(Database({str(tmp_path / "state.sqlite")!r}))
        while True:
            ledger.settle(None, 0.01)
    """)
    last = 0.0
    for kill in range(6):
        proc = subprocess.Popen([sys.executable, "-c", writer])
        time.sleep(1.0 + 0.05 * kill)  # land the kill at a different point of the write each time
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        total = _ledger(tmp_path).spent()  # readable after every kill
        assert total >= last
        last = total
    assert last > 0.05


def test_reservations_make_the_budget_check_and_the_spend_one_step(tmp_path, monkeypatch):
    from router_pipeline.serve import ledger as ledger_module

    led = _ledger(tmp_path)
    first = led.admit(1.0, 0.8)
    assert first and led.committed() == pytest.approx(0.8)
    second = led.admit(1.0, 0.8)  # 0.8 < 1.0 committed: admitted, and now over
    assert second and led.admit(1.0, 0.1) is None
    led.settle(first, 0.05)  # the first request cost 0.05, not its 0.8 upper bound
    led.release(second)  # the second spent nothing (every model failed)
    assert led.spent() == pytest.approx(0.05) and led.committed() == pytest.approx(0.05)
    stale = led.admit(1.0, 0.9)
    monkeypatch.setattr(ledger_module, "RESERVATION_TTL_S", 0.0)  # its request ended long ago
    assert led.committed() == pytest.approx(0.05) and led.admit(1.0, 0.1) is not None and stale


def test_a_failing_database_stops_spending_naming_the_budget(tmp_path):
    led = _ledger(tmp_path, "team")
    led.settle(None, 0.5)
    led.db.execute("DROP TABLE spend")  # an operator's mistake, a damaged file
    for call in (led.spent, lambda: led.admit(1.0, 0.1), lambda: led.settle(None, 0.1)):
        with pytest.raises(LedgerError, match="budget ledger team") as err:
            call()
        assert err.value.file == "team"
    with pytest.raises(RuntimeError, match="not bound"):
        BudgetLedger("unbound").spent()


def test_a_journaled_spend_whose_settle_had_landed_is_not_charged_again(tmp_path):
    """On PostgreSQL a settle can commit while its acknowledgement is lost: the spend is
    then journaled as unwritten too. The replay finds its reservation gone and skips it;
    a spend that never landed (its reservation still there) is written."""
    from router_pipeline.serve.gateway import _apply_journaled
    from router_pipeline.serve.journal import SpendJournal

    ledger = _ledger(tmp_path)
    landed = ledger.admit(10.0, 0.5)
    ledger.settle(landed, 0.2)
    lost = ledger.admit(10.0, 0.5)
    journal = SpendJournal(tmp_path / "journal")
    journal.append({"spends": [ledger.settlement(landed, 0.2), ledger.settlement(lost, 0.3)]})
    assert journal.replay(ledger.db, _apply_journaled) == 1
    assert ledger.spent() == pytest.approx(0.5) and ledger.committed() == pytest.approx(0.5)
