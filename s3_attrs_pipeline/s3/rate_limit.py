"""Client-side pacing of S3 requests: unlimited until S3 throttles, then adaptive.

botocore's adaptive retry mode cannot see throttling on HEAD: a 503 to a HEAD has no body, so no
`SlowDown` code, and botocore only recognises throttling by code. This limiter is told directly.
"""

import collections
import random
import threading
import time

MIN_RATE = 5.0  # requests per second: never slower than this, however hard S3 throttles
DECREASE_FACTOR = 0.7
DECREASE_COOLDOWN_S = 1.0  # one throttling burst (every request in flight at once) lowers the rate once
RECOVERY_PER_SECOND = 0.2  # each second without throttling allows 20% more
UNLIMITED_ABOVE = 20_000.0
HELD_POLL_S = 0.2  # how often a held request looks whether its store was stopped


def backoff_delay(attempt: int, base_s: float = 0.25, cap_s: float = 10.0) -> float:
    """Exponential backoff with full jitter before retry number `attempt` (1, 2, ...)."""
    return random.uniform(0, min(cap_s, base_s * 2**attempt))


class AdaptiveRateLimiter:
    """Shared by every thread of one store. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._rate: float | None = None  # None: no limit
        self._next_slot = 0.0
        self._last_change = 0.0
        self._recent_sends: collections.deque[float] = collections.deque()
        self._ceiling: float | None = None  # the operator's (s3-attrs throttle), whatever S3 allows
        self._held = False  # the operator's pause
        self._released = threading.Condition(self._lock)
        self.throttle_events = 0
        self.lowest_rate: float | None = None

    @property
    def rate(self) -> float | None:
        """Requests per second now: the lower of the adaptive rate and the operator's ceiling."""
        if self._ceiling is None:
            return self._rate
        return self._ceiling if self._rate is None else min(self._rate, self._ceiling)

    def set_ceiling(self, requests_per_second: float | None) -> None:
        """The operator's ceiling (None lifts it), from the next request on."""
        with self._lock:
            self._ceiling = requests_per_second
            rate = self.rate
            self._next_slot = min(self._next_slot, time.monotonic() + (1.0 / rate if rate else 0.0))

    def hold(self, held: bool) -> None:
        """While held (the operator paused the run), no request is sent: each waits in `acquire`."""
        with self._lock:
            self._held = held
            self._released.notify_all()

    def acquire(self, stopped: threading.Event) -> bool:
        """Wait for this request's turn: True, or False if `stopped` was set while the store was held."""
        while True:
            with self._lock:
                while self._held:
                    if stopped.is_set():
                        return False
                    self._released.wait(HELD_POLL_S)
                now = time.monotonic()
                self._recent_sends.append(now)
                while self._recent_sends and self._recent_sends[0] < now - 1.0:
                    self._recent_sends.popleft()
                rate = self.rate
                if rate is None:
                    return True
                slot = max(now, self._next_slot)
                self._next_slot = slot + 1.0 / rate
            if slot > now:
                time.sleep(slot - now)
                with self._lock:
                    if self._held:
                        continue  # held while it waited for its turn: it waits for the release, then anew
            return True

    def throttled(self) -> None:
        with self._lock:
            now = time.monotonic()
            self.throttle_events += 1
            if self._rate is not None and now - self._last_change < DECREASE_COOLDOWN_S:
                return
            sending = float(max(1, len(self._recent_sends)))  # requests in the last second
            current = sending if self._rate is None else min(self._rate, sending)
            self._rate = max(MIN_RATE, current * DECREASE_FACTOR)
            self._last_change = now
            self.lowest_rate = self._rate if self.lowest_rate is None else min(self.lowest_rate, self._rate)

    def succeeded(self) -> None:
        if self._rate is None:
            return
        with self._lock:
            now = time.monotonic()
            if self._rate is None or now - self._last_change < 1.0:
                return
            self._rate *= 1 + RECOVERY_PER_SECOND
            self._last_change = now
            if self._rate > UNLIMITED_ABOVE:
                self._rate = None
