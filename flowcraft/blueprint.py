"""The blueprint wire model: nodes, edges, config, and their camelCase JSON form.

A blueprint written for Flowcraft TS loads unchanged and round-trips losslessly: keys this model
does not know are kept in `extra` and written back. On the wire `retryDelay` and `timeout` are
milliseconds; in Python they are seconds.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import attrs

from .errors import BlueprintError, ExpressionError
from .limits import CONCURRENCY_KEY, MAX_CONCURRENCY, config_problems
from .ports import identity_problem

MAX_BLUEPRINT_DEPTH = 64  # lists/objects nested deeper than this (the blueprint object is level 1) are refused

JOIN_STRATEGIES = ("all", "any")
Inputs = Union[str, Dict[str, str], None]

_CONFIG_KEYS = {
    "maxRetries": "max_retries",
    "retryDelay": "retry_delay",
    "timeout": "timeout",
    "fallback": "fallback",
    "joinStrategy": "join_strategy",
}
_NODE_KEYS = ("id", "uses", "params", "inputs", "config")
_EDGE_KEYS = ("source", "target", "action", "condition", "transform")
_BLUEPRINT_KEYS = ("id", "nodes", "edges", "metadata")


def _ms_to_seconds(value: Any) -> Any:
    return value / 1000 if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _seconds_to_ms(value: Any) -> Any:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    ms = value * 1000
    rounded = round(ms)
    return rounded if abs(ms - rounded) < 1e-6 else ms


@attrs.frozen
class NodeConfig:
    """Per-node execution settings. `None` means "not set" (the engine default applies)."""

    max_retries: Optional[int] = None  # total attempts of exec(); 1 = no retry
    retry_delay: Optional[float] = None  # seconds between attempts
    timeout: Optional[float] = None  # seconds, per attempt
    fallback: Optional[str] = None  # id of the node that runs in this one's place
    join_strategy: Optional[str] = None  # "all" (default) or "any"
    extra: Dict[str, Any] = attrs.field(factory=dict)

    @property
    def attempts(self) -> int:
        return self.max_retries if self.max_retries and self.max_retries > 0 else 1

    @property
    def join(self) -> str:
        return self.join_strategy or "all"

    # the concurrency limit (SPEC 14, `flowcraft.limits`) stays in `extra`, in its wire form
    @property
    def concurrency_key(self) -> Optional[str]:
        return self.extra.get(CONCURRENCY_KEY)

    @property
    def max_concurrency(self) -> Optional[int]:
        return self.extra.get(MAX_CONCURRENCY)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "NodeConfig":
        data = dict(data or {})
        known = {attr: data.pop(key) for key, attr in _CONFIG_KEYS.items() if data.get(key) is not None}
        for attr in ("retry_delay", "timeout"):
            if attr in known:
                known[attr] = _ms_to_seconds(known[attr])
        return cls(**known, extra=data)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, attr in _CONFIG_KEYS.items():
            value = getattr(self, attr)
            if value is not None:
                out[key] = _seconds_to_ms(value) if attr in ("retry_delay", "timeout") else value
        out.update(self.extra)
        return out

    def problems(self, where: str) -> List[str]:
        found = []
        if self.join_strategy is not None and self.join_strategy not in JOIN_STRATEGIES:
            found.append(f"{where}: joinStrategy must be 'all' or 'any', not {self.join_strategy!r}")
        if self.max_retries is not None and (
            not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 1
        ):
            found.append(f"{where}: maxRetries must be a whole number >= 1, not {self.max_retries!r}")
        for name, value in (("retryDelay", self.retry_delay), ("timeout", self.timeout)):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not 0 <= value < math.inf):
                found.append(f"{where}: {name} must be a non-negative number of milliseconds, not {value!r}")
        if self.fallback is not None and not isinstance(self.fallback, str):
            found.append(f"{where}: fallback must be a node id, not {self.fallback!r}")
        if "queue" in self.extra:  # routing (SPEC 14): kept in `extra`, as the wire has it
            problem = identity_problem(self.extra["queue"])
            if problem is not None:
                found.append(f"{where}: queue must be a queue name: {self.extra['queue']!r} {problem}")
        return found


@attrs.frozen
class NodeDefinition:
    id: str
    uses: str
    params: Optional[Dict[str, Any]] = None
    inputs: Inputs = None
    config: Optional[NodeConfig] = None
    extra: Dict[str, Any] = attrs.field(factory=dict)

    @property
    def settings(self) -> NodeConfig:
        """The config, or an all-defaults one."""
        return self.config if self.config is not None else _DEFAULT_CONFIG

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NodeDefinition":
        data = dict(data)
        config = data.pop("config") if data.get("config") is not None else None
        known = {key: data.pop(key) for key in ("id", "uses", "params", "inputs") if data.get(key) is not None}
        return cls(
            id=known.get("id"),  # type: ignore[arg-type]
            uses=known.get("uses"),  # type: ignore[arg-type]
            params=known.get("params"),
            inputs=known.get("inputs"),
            config=NodeConfig.from_dict(config) if isinstance(config, Mapping) else config,
            extra=data,
        )

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"id": self.id, "uses": self.uses}
        if self.params is not None:
            out["params"] = self.params
        if self.inputs is not None:
            out["inputs"] = self.inputs
        if self.config is not None:
            out["config"] = self.config.to_dict()
        out.update(self.extra)
        return out


_DEFAULT_CONFIG = NodeConfig()


@attrs.frozen
class EdgeDefinition:
    source: str
    target: str
    action: Optional[str] = None
    condition: Optional[str] = None
    transform: Optional[str] = None
    extra: Dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EdgeDefinition":
        data = dict(data)
        known = {key: data.pop(key) for key in _EDGE_KEYS if data.get(key) is not None}
        return cls(
            source=known.get("source"),  # type: ignore[arg-type]
            target=known.get("target"),  # type: ignore[arg-type]
            action=known.get("action"),
            condition=known.get("condition"),
            transform=known.get("transform"),
            extra=data,
        )

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"source": self.source, "target": self.target}
        for key in ("action", "condition", "transform"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out


def _as_tuple(items: Any) -> Tuple[Any, ...]:
    return tuple(items) if items is not None else ()


@attrs.frozen(eq=True)
class WorkflowBlueprint:
    id: str
    nodes: Tuple[NodeDefinition, ...] = attrs.field(converter=_as_tuple, factory=tuple)
    edges: Tuple[EdgeDefinition, ...] = attrs.field(converter=_as_tuple, factory=tuple)
    metadata: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = attrs.field(factory=dict)

    @property
    def version(self) -> Optional[str]:
        """`metadata.version`, or None."""
        return (self.metadata or {}).get("version")

    def node(self, node_id: str) -> NodeDefinition:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    # --- wire format -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> "WorkflowBlueprint":
        """Build and validate; raises `BlueprintError` listing every problem.

        Refused before anything else: nesting deeper than `MAX_BLUEPRINT_DEPTH`, and NaN or
        infinite numbers anywhere (each named by the node and field holding it)."""
        problems = _shape_problems(data)
        if not isinstance(data, Mapping):
            raise BlueprintError(problems)
        unsafe = _value_problems(data)
        if unsafe:
            raise BlueprintError(unsafe, data.get("id") if isinstance(data.get("id"), str) else None)
        data = dict(data)
        known = {key: data.pop(key) for key in _BLUEPRINT_KEYS if data.get(key) is not None}
        lists: Dict[str, List[Any]] = {key: known[key] if isinstance(known.get(key), list) else [] for key in ("nodes", "edges")}
        blueprint = cls(
            id=known.get("id"),  # type: ignore[arg-type]
            nodes=[NodeDefinition.from_dict(n) for n in lists["nodes"] if isinstance(n, Mapping)],
            edges=[EdgeDefinition.from_dict(e) for e in lists["edges"] if isinstance(e, Mapping)],
            metadata=known.get("metadata") if isinstance(known.get("metadata"), Mapping) else None,
            extra=data,
        )
        problems += [p for p in blueprint.problems() if p not in problems]
        if problems:
            blueprint_id = known.get("id") if isinstance(known.get("id"), str) else None
            raise BlueprintError(problems, blueprint_id)
        return blueprint

    @classmethod
    def from_json(cls, text: Union[str, bytes, bytearray]) -> "WorkflowBlueprint":
        try:
            data = json.loads(text)
        except RecursionError:
            raise BlueprintError([f"not valid JSON: nested deeper than {MAX_BLUEPRINT_DEPTH} levels"]) from None
        except (ValueError, TypeError) as exc:
            raise BlueprintError([f"not valid JSON: {exc}"]) from None
        return cls.from_dict(data)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "id": self.id,
            "nodes": [n.to_dict() for n in self.nodes],
            "edges": [e.to_dict() for e in self.edges],
        }
        if self.metadata is not None:
            out["metadata"] = self.metadata
        out.update(self.extra)
        return out

    def to_json(self, **dumps_options: Any) -> str:
        return json.dumps(self.to_dict(), **dumps_options)

    # --- validation --------------------------------------------------------------------------

    def problems(self, evaluator: Any = None) -> List[str]:
        """Every problem with this blueprint, as readable sentences (empty when valid)."""
        found: List[str] = []
        if self.id is None:
            found.append("missing 'id'")
        elif not isinstance(self.id, str) or not self.id:
            found.append(f"blueprint id must be a non-empty string, not {self.id!r}")
        elif identity_problem(self.id):
            found.append(f"blueprint id {identity_problem(self.id)}")
        ids = set()
        for index, node in enumerate(self.nodes):
            where = f"node {node.id!r}" if isinstance(node.id, str) and node.id else f"node #{index}"
            if node.id is None:
                found.append(f"{where}: missing 'id'")
            elif not isinstance(node.id, str) or not node.id:
                found.append(f"{where}: id must be a non-empty string, not {node.id!r}")
            elif identity_problem(node.id):
                found.append(f"{where}: id {identity_problem(node.id)}")
            elif node.id in ids:
                found.append(f"{where}: duplicate node id")
            else:
                ids.add(node.id)
            if node.uses is None:
                found.append(f"{where}: missing 'uses'")
            elif not isinstance(node.uses, str) or not node.uses:
                found.append(f"{where}: 'uses' must be a non-empty string, not {node.uses!r}")
            if node.params is not None and not isinstance(node.params, Mapping):
                found.append(f"{where}: params must be an object, not {type(node.params).__name__}")
            if not _valid_inputs(node.inputs):
                found.append(f"{where}: inputs must be a context key or an object of name -> key")
            if node.config is not None:
                if isinstance(node.config, NodeConfig):
                    found.extend(node.config.problems(where))
                else:
                    found.append(f"{where}: config must be an object")
        evaluator = evaluator if evaluator is not None else _default_evaluator()
        for node in self.nodes:
            if isinstance(node.config, NodeConfig) and node.config.extra:
                found.extend(config_problems(node.config, f"node {node.id!r}", evaluator))
        for index, edge in enumerate(self.edges):
            where = f"edge #{index} ({edge.source!r} -> {edge.target!r})"
            for end in ("source", "target"):
                value = getattr(edge, end)
                if value is None:
                    found.append(f"{where}: missing '{end}'")
                elif not isinstance(value, str) or value not in ids:
                    found.append(f"{where}: unknown {end} node {value!r}")
            if edge.action is not None and not isinstance(edge.action, str):
                found.append(f"{where}: action must be a string, not {edge.action!r}")
            for kind in ("condition", "transform"):
                source = getattr(edge, kind)
                if source is None or source == "":  # "" is no expression, as in TS
                    continue
                if not isinstance(source, str):
                    found.append(f"{where}: {kind} must be a string expression, not {source!r}")
                    continue
                try:
                    evaluator.compile(source)
                except ExpressionError as exc:
                    found.append(f"{where}: {kind} {source!r} cannot be parsed: {exc}")
        return found

    def validate(self, evaluator: Any = None) -> "WorkflowBlueprint":
        """Raise `BlueprintError` listing every problem; return self when valid."""
        found = self.problems(evaluator)
        if found:
            raise BlueprintError(found, self.id)
        return self


def _valid_inputs(inputs: Any) -> bool:
    if inputs is None or isinstance(inputs, str):
        return True
    return isinstance(inputs, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in inputs.items())


def _shape_problems(data: Any) -> List[str]:
    """Problems that stop the JSON from being read into the model at all."""
    if not isinstance(data, Mapping):
        return [f"a blueprint must be a JSON object, not {type(data).__name__}"]
    found = []
    for key, item in (("nodes", "node"), ("edges", "edge")):
        items = data.get(key)
        if items is None:
            if key == "nodes":
                found.append("missing 'nodes'")
            continue
        if not isinstance(items, list):
            found.append(f"'{key}' must be a list, not {type(items).__name__}")
            continue
        for index, entry in enumerate(items):
            if not isinstance(entry, Mapping):
                found.append(f"{item} #{index} must be an object, not {type(entry).__name__}")
                continue
            if key == "nodes" and entry.get("config") is not None and not isinstance(entry["config"], Mapping):
                found.append(f"{item} #{index}: config must be an object")
    if "metadata" in data and data["metadata"] is not None and not isinstance(data["metadata"], Mapping):
        found.append("'metadata' must be an object")
    return found


def _value_problems(data: Mapping[str, Any]) -> List[str]:
    """Nesting past `MAX_BLUEPRINT_DEPTH` and non-finite numbers, walked iteratively (a deep
    document never recurses here); a node's values are named by the node's id and the field."""
    found: List[str] = []
    stack: List[Tuple[Any, str, int]] = [(data, "", 1)]
    while stack and len(found) < 20:
        value, path, depth = stack.pop()
        if type(value) is float and not math.isfinite(value):
            found.append(f"{path}: {value!r} is not allowed, a blueprint holds finite numbers only")
        if not isinstance(value, (Mapping, list, tuple)):
            continue
        if depth > MAX_BLUEPRINT_DEPTH:
            found.append(f"{path}: nested deeper than {MAX_BLUEPRINT_DEPTH} levels")
            continue
        pairs = value.items() if isinstance(value, Mapping) else enumerate(value)
        for key, child in pairs:
            if path == "nodes" and isinstance(child, Mapping) and isinstance(child.get("id"), str):
                child_path = f"node {child['id']!r}"
            elif path.startswith("node ") and depth == 3:
                child_path = f"{path}: {key}"
            else:
                child_path = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))
            stack.append((child, child_path, depth + 1))
    return sorted(found)


def _default_evaluator() -> Any:
    from .evaluator import default_evaluator

    return default_evaluator()


def blueprint_digest(blueprint: WorkflowBlueprint) -> str:
    """A short, stable fingerprint of a blueprint: sha256 of the canonical JSON of its wire form
    (sorted keys, no spaces), 16 hex digits. Recorded with a run, it tells a worker whose blueprint
    has the same id and version but was edited that the run is not of its graph."""
    canonical = json.dumps(blueprint.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def as_blueprint(bp: Any) -> WorkflowBlueprint:
    """A `WorkflowBlueprint` from itself, its dict or JSON form, or a `Flow`."""
    if isinstance(bp, WorkflowBlueprint):
        return bp
    if isinstance(bp, Mapping):
        return WorkflowBlueprint.from_dict(bp)
    if isinstance(bp, (str, bytes, bytearray)):
        return WorkflowBlueprint.from_json(bp)
    to_blueprint = getattr(bp, "to_blueprint", None)  # a `Flow`
    if callable(to_blueprint):
        return to_blueprint()
    raise TypeError(f"expected a WorkflowBlueprint, its dict or JSON form, or a Flow; not {type(bp).__name__}")


def _records(items: Any) -> List[Any]:
    if isinstance(items, (list, tuple)):
        return list(items)
    return list(items.values()) if isinstance(items, Mapping) else []


def sanitize_blueprint(raw: Any) -> WorkflowBlueprint:
    """A blueprint with only the keys the engine knows, as TS's `sanitizeBlueprint`: what a UI adds
    (positions, styles, `__proto__`-like keys) is dropped from the blueprint, its nodes, edges and
    node configs; `nodes`/`edges` may be lists or objects keyed by id. `params` and `metadata` are
    kept as they are. The default loaders keep unknown keys (a lossless round trip); use this for a
    blueprint exported from an editor."""
    if isinstance(raw, (str, bytes, bytearray)):
        raw = json.loads(raw)
    elif isinstance(raw, WorkflowBlueprint):
        raw = raw.to_dict()
    if not isinstance(raw, Mapping):
        raise TypeError(f"sanitize_blueprint expects a blueprint object, not {type(raw).__name__}")

    def known(item: Any, keys: Tuple[str, ...]) -> Any:
        if not isinstance(item, Mapping):
            return item  # from_dict names what is wrong with it
        return {k: item[k] for k in keys if item.get(k) is not None}

    nodes = []
    for node in _records(raw.get("nodes")):
        clean = known(node, _NODE_KEYS)
        if isinstance(clean, dict) and isinstance(clean.get("config"), Mapping):
            clean["config"] = known(clean["config"], tuple(_CONFIG_KEYS))
        nodes.append(clean)
    edges = [known(edge, _EDGE_KEYS) for edge in _records(raw.get("edges"))]
    data = {k: raw[k] for k in ("id", "metadata") if raw.get(k) is not None}
    data.update(nodes=nodes, edges=edges)
    return WorkflowBlueprint.from_dict(data)
