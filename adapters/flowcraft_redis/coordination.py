"""`RedisCoordinationStore`: the Flowcraft TS coordination methods on Redis strings with TTLs."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from ._util import load_script, to_text, translate_errors
from .keys import coordination_key, validate_prefix


def _ms(ttl: Optional[float]) -> Optional[int]:
    """A TTL in seconds as whole milliseconds; None (no expiry) for 0 or None."""
    if not ttl:
        return None
    if ttl < 0:
        raise ValueError(f"a TTL must be >= 0 seconds, not {ttl!r}")
    return max(1, int(round(ttl * 1000)))


class RedisCoordinationStore:
    """Counters and markers with a TTL (seconds; 0 or None = no expiry) on the keys as given, as
    Flowcraft TS's store (a TS and a Python service share locks by name), under `prefix` verbatim
    (default none: ``increment("lock:a", 10)`` writes the key ``lock:a``).

    Each method does what the TS one does: `increment` INCRs and (re)sets the TTL, `set_if_not_exist`
    is ``SET NX`` with the TTL, `extend_ttl` resets the TTL of an existing key, `delete` DELs, `get`
    GETs (text, or None).

    The slots of concurrency limits (`flowcraft.limits`) are one ZSET per key, holder -> expiry
    (ms, the server's clock): `acquire_slots` and `renew_slots` are one script call each (for any number of slots),
    `release_slots` one ZREM per slot in one pipeline."""

    def __init__(self, client: Any, prefix: str = "") -> None:
        self.client = client
        self.prefix = validate_prefix(prefix)
        self._acquire = load_script(client, "slot_acquire.lua")
        self._renew = load_script(client, "slot_renew.lua")

    def key(self, key: str) -> str:
        return coordination_key(self.prefix, key)

    @translate_errors
    def increment(self, key: str, ttl: float) -> int:
        name = self.key(key)
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(name)
        ms = _ms(ttl)
        if ms is None:
            pipe.persist(name)
        else:
            pipe.pexpire(name, ms)
        return int(pipe.execute()[0])

    @translate_errors
    def set_if_not_exist(self, key: str, value: str, ttl: float) -> bool:
        return bool(self.client.set(self.key(key), str(value), nx=True, px=_ms(ttl)))

    @translate_errors
    def extend_ttl(self, key: str, ttl: float) -> bool:
        name = self.key(key)
        ms = _ms(ttl)
        if ms is None:
            return bool(self.client.exists(name)) and (self.client.persist(name) or True)
        return bool(self.client.pexpire(name, ms))

    @translate_errors
    def delete(self, key: str) -> None:
        self.client.delete(self.key(key))

    @translate_errors
    def get(self, key: str) -> Optional[str]:
        value = self.client.get(self.key(key))
        return None if value is None else to_text(value)

    @translate_errors
    def acquire_slots(self, requests: Sequence[Tuple[str, str, int]], ttl: float) -> List[bool]:
        """Slots of several keys in one script call: per `(name, holder, limit)`, whether taken."""
        args: List[Any] = [_ms(ttl)]
        for _, holder, limit in requests:
            args += [holder, int(limit)]
        return [bool(x) for x in self._acquire(keys=[self.key(name) for name, _, _ in requests], args=args)]

    @translate_errors
    def renew_slots(self, slots: Sequence[Any], ttl: float) -> None:
        self._renew(keys=[self.key(s.name) for s in slots], args=[_ms(ttl), *(s.holder for s in slots)])

    @translate_errors
    def release_slots(self, slots: Sequence[Any]) -> None:
        if len(slots) == 1:
            self.client.zrem(self.key(slots[0].name), slots[0].holder)
            return
        pipe = self.client.pipeline(transaction=False)
        for slot in slots:
            pipe.zrem(self.key(slot.name), slot.holder)
        pipe.execute()
