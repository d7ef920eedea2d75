"""Process-wide state that the runner's threads share."""

import sys
import threading
import time
import warnings

from conformance.isolation import muted


def test_muted_blocks_in_two_threads_leave_stdout_and_warnings_as_they_were():
    """Thread A mutes, then thread B; A finishes first. Swapping ``sys.stdout`` without
    taking turns, B would then restore A's dropped buffer, and every later print of the
    process (the run's table) would vanish."""
    before = sys.stdout
    filters = list(warnings.filters)
    a_inside, b_inside = threading.Event(), threading.Event()

    def a():
        with muted():
            a_inside.set()
            b_inside.wait(0.5)  # B cannot get in while A holds the block: this times out

    def b():
        a_inside.wait(5)
        with muted():
            b_inside.set()
            time.sleep(0.1)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sys.stdout is before
    assert warnings.filters == filters


def test_muted_drops_prints_and_warnings_and_restores_them():
    before = sys.stdout
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with muted():
            print("third-party chatter")
            warnings.warn("third-party warning", stacklevel=1)
        warnings.warn("ours", stacklevel=1)
    assert sys.stdout is before
    assert [str(w.message) for w in seen] == ["ours"]
