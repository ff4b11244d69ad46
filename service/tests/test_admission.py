import threading
import time

import pytest

from pilotys_whisper.admission import Admission
from pilotys_whisper.errors import ApiError


def _hold(admission, release, entered, **kw):
    with admission.slot(**kw):
        entered.set()
        release.wait(10)


def test_queue_then_429_with_retry_after():
    admission = Admission(concurrency=1, queue_size=1, initial_estimate_s=7)
    release = threading.Event()
    first, second = threading.Event(), threading.Event()
    running = threading.Thread(target=_hold, args=(admission, release, first))
    running.start()
    assert first.wait(5)
    queued = threading.Thread(target=_hold, args=(admission, release, second))
    queued.start()
    deadline = time.monotonic() + 5
    while admission.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not second.is_set(), "the second request waits for the slot"
    with pytest.raises(ApiError) as err:
        with admission.slot():
            pass
    assert err.value.status == 429
    assert int(err.value.headers["Retry-After"]) >= 7  # two ahead, one slot, ~7 s each
    release.set()
    running.join(5)
    queued.join(5)
    assert second.is_set()
    assert admission.running == 0 and admission.waiting == 0


def test_background_jobs_do_not_take_queue_places():
    admission = Admission(concurrency=1, queue_size=1)
    release = threading.Event()
    entered = threading.Event()
    job = threading.Thread(target=_hold, args=(admission, release, entered), kwargs={"bounded_queue": False})
    job.start()
    assert entered.wait(5)
    waiting_job = threading.Thread(target=_hold, args=(admission, release, threading.Event()),
                                   kwargs={"bounded_queue": False})
    waiting_job.start()
    # A synchronous caller still finds its queue place free: it would wait, not get 429.
    assert admission.waiting == 0
    release.set()
    job.join(5)
    waiting_job.join(5)


def test_slot_is_released_on_error():
    admission = Admission(concurrency=1, queue_size=0)
    with pytest.raises(RuntimeError):
        with admission.slot():
            raise RuntimeError("engine failed")
    with admission.slot():
        assert admission.running == 1
