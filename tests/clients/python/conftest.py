import signal

import pika
import pytest

from amqp_helpers import connect, unique

TEST_HARD_TIMEOUT = 10  # seconds; a hung broker fails the test instead of the run
TEARDOWN_GRACE = 5  # seconds granted to teardown after a timeout
# After this many tests in a row hit the hard timeout the broker is taken to
# be unresponsive and the remaining tests fail at once instead of each waiting.
MAX_CONSECUTIVE_TIMEOUTS = 3
_consecutive_timeouts = 0


class TestTimedOut(Exception):
    pass


@pytest.fixture(autouse=True)
def hard_timeout():
    global _consecutive_timeouts
    if _consecutive_timeouts >= MAX_CONSECUTIVE_TIMEOUTS:
        pytest.fail("not run: broker stopped responding (%d tests in a row timed out)"
                    % _consecutive_timeouts, pytrace=False)
    timed_out = []

    def on_alarm(signum, frame):
        # Re-arm so that a teardown blocked on the same broker is interrupted
        # too; the finalizer below disarms it.
        signal.alarm(TEARDOWN_GRACE)
        timed_out.append(True)
        raise TestTimedOut("test exceeded %ds hard timeout" % TEST_HARD_TIMEOUT)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_HARD_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        _consecutive_timeouts = _consecutive_timeouts + 1 if timed_out else 0


@pytest.fixture
def conn():
    connection = connect()
    yield connection
    if connection.is_open:
        try:
            connection.close()
        except Exception:
            pass


@pytest.fixture
def ch(conn):
    return conn.channel()


class Names:
    """Hands out unique exchange/queue names and deletes them afterwards."""

    def __init__(self):
        self.exchanges = []
        self.queues = []

    def exchange(self, kind="x"):
        name = unique("ex-" + kind)
        self.exchanges.append(name)
        return name

    def queue(self, kind="q"):
        name = unique("q-" + kind)
        self.queues.append(name)
        return name

    def cleanup(self):
        if not (self.exchanges or self.queues):
            return
        connection = connect()
        try:
            channel = connection.channel()
            for name in self.queues:
                try:
                    channel.queue_delete(name)
                except pika.exceptions.ChannelClosedByBroker:
                    channel = connection.channel()
            for name in self.exchanges:
                try:
                    channel.exchange_delete(name)
                except pika.exceptions.ChannelClosedByBroker:
                    channel = connection.channel()
        finally:
            connection.close()


@pytest.fixture
def names():
    registry = Names()
    yield registry
    registry.cleanup()
