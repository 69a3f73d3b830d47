import threading


class FIFOLock:
    """Like the WebUI's modules.fifo_lock.FIFOLock: acquire(blocking)/release/context manager, no locked()."""

    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, blocking=True):
        return self._lock.acquire(blocking)

    def release(self):
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, t, v, tb):
        self.release()


queue_lock = FIFOLock()


def held():
    """Test aid: True while someone holds queue_lock."""
    if queue_lock.acquire(blocking=False):
        queue_lock.release()
        return False
    return True
