"""`RedisContext`: a run's context as the seed stores it, a hash ``workflow:state:<runId>`` with one
JSON value per field. A field that is not valid JSON (a seed client's raw ``hset``) reads as the
string it holds."""
from __future__ import annotations

import json
from typing import Any, Dict, Iterable, Mapping

from .keys import RunKeys

# Built once: `json.dumps`/`json.loads` with options build a new coder per call, and a worker
# encodes and decodes about twenty values per node execution.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_decode = json.JSONDecoder().decode


def encode(value: Any) -> str:
    """One context value as stored: compact JSON."""
    return _encode(value)


def decode(raw: Any) -> Any:
    """A stored field: its JSON value, or the raw text when it is not JSON."""
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace") if type(raw) is bytes or isinstance(raw, bytearray) else str(raw)
    try:
        return _decode(text)
    except ValueError:
        return text


def decode_hash(raw: Mapping[Any, Any]) -> Dict[str, Any]:
    """A whole hash (HGETALL), every field decoded, none dropped."""
    return {(k.decode("utf-8", "replace") if isinstance(k, (bytes, bytearray)) else str(k)): decode(v) for k, v in raw.items()}


class RedisContext:
    """Direct access to one run's context hash (each call is one Redis command).

    Workers do not use it (they read through the run store and write with the node's commit); it
    is for clients and tools: seeding a run, inspecting a context.
    """

    def __init__(self, client: Any, run_id: str, prefix: str = "") -> None:
        self.client = client
        self.run_id = run_id
        self.key = RunKeys(prefix).context(run_id)

    encode = staticmethod(encode)
    decode = staticmethod(decode)

    def get(self, key: str, default: Any = None) -> Any:
        raw = self.client.hget(self.key, key)
        return default if raw is None else decode(raw)

    def get_many(self, keys: Iterable[str]) -> Dict[str, Any]:
        keys = list(keys)
        if not keys:
            return {}
        return {k: decode(v) for k, v in zip(keys, self.client.hmget(self.key, keys)) if v is not None}

    def set(self, key: str, value: Any) -> None:
        self.client.hset(self.key, key, encode(value))

    def update(self, values: Mapping[str, Any]) -> None:
        if values:
            self.client.hset(self.key, mapping={k: encode(v) for k, v in values.items()})

    def has(self, key: str) -> bool:
        return bool(self.client.hexists(self.key, key))

    def delete(self, key: str) -> None:
        self.client.hdel(self.key, key)

    def to_dict(self) -> Dict[str, Any]:
        return decode_hash(self.client.hgetall(self.key))

    def exists(self) -> bool:
        return bool(self.client.exists(self.key))
