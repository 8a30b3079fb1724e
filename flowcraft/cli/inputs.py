"""Reading the command's inputs: the `--app` runtime, blueprint files or ids, JSON arguments.

Every problem raises `CliError` with a message naming the thing at fault; nothing here has side
effects beyond importing the app module.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any, Optional

from ..blueprint import WorkflowBlueprint
from ..errors import BlueprintError, SerializationError
from ..runtime import FlowRuntime
from ..serializer import check_json
from .errors import CliError, one_line

# --- the app ----------------------------------------------------------------------------------


def load_app(spec: Optional[str]) -> FlowRuntime:
    """The `FlowRuntime` named by `MODULE:ATTR` (an empty runtime when `spec` is None).

    ATTR may be a `FlowRuntime`, a `Flow`, a registry (a mapping of `uses` keys), or a callable
    returning one of those."""
    if spec is None:
        return FlowRuntime()
    module_name, attr_path = _split_app(spec)
    target = _resolve_attr(_import_app_module(module_name), module_name, attr_path)
    runtime = _as_runtime(target)
    if runtime is None and callable(target):
        runtime = _as_runtime(_call_factory(target, spec))
    if runtime is None:
        raise CliError(f"--app {spec!r} is a {type(target).__name__}, not a FlowRuntime, Flow, registry "
                       f"or a callable returning one")
    return runtime


def _split_app(spec: str) -> tuple:
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise CliError(f"--app {spec!r} must be MODULE:ATTR, e.g. examples.order_app:runtime")
    return module_name, attr_path


def _import_app_module(module_name: str) -> Any:
    # A console script does not put the working directory on sys.path (python -m does): add it,
    # so `--app myproject.app:runtime` works from the project's root either way.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise CliError(f"cannot import app module {module_name!r}: no module named {error.name!r}") from None
        raise CliError(f"importing app module {module_name!r} failed: {one_line(error)}") from error
    except Exception as error:  # the user's module raised while importing: one line (--debug: their traceback)
        raise CliError(f"importing app module {module_name!r} failed: {type(error).__name__}: {one_line(error)}") from error


def _resolve_attr(module: Any, module_name: str, attr_path: str) -> Any:
    target = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise CliError(f"app module {module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, part)
    return target


def _as_runtime(target: Any) -> Optional[FlowRuntime]:
    if isinstance(target, FlowRuntime):
        return target
    if hasattr(target, "to_blueprint") and hasattr(target, "registry"):  # a Flow
        runtime = FlowRuntime()
        runtime.add_blueprint(target)
        return runtime
    if isinstance(target, Mapping):
        return FlowRuntime(registry=target)
    return None


def _call_factory(factory: Any, spec: str) -> Any:
    try:
        return factory()
    except Exception as error:
        raise CliError(f"--app {spec!r}: calling it failed: {type(error).__name__}: {one_line(error)}") from error


# --- blueprints -------------------------------------------------------------------------------


def is_blueprint_file(ref: str) -> bool:
    """A blueprint argument names a file when it exists or ends with `.json`; else it is an id."""
    return ref.endswith(".json") or os.path.isfile(ref)


def read_json_file(path: str, what: str) -> Any:
    """The parsed JSON of a file; `what` names it in messages ("blueprint file", ...)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise CliError(f"cannot read {what} {path!r}: {error.strerror or one_line(error)}") from None
    except UnicodeDecodeError:
        raise CliError(f"cannot read {what} {path!r}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise CliError(f"{what} {path!r} is not valid JSON: {one_line(error)}") from None
    return _only_json(data, f"{what} {path!r}", "$")


def _only_json(data: Any, what: str, where: str) -> Any:
    """`data` as parsed, unless it holds NaN or Infinity: Python's parser takes those literals (and
    turns 1e999 into Infinity), JSON and every backend do not. Said here, naming the option or
    file and where in it, before anything runs or is stored (the check is the engine's one)."""
    try:
        check_json(data, where, None)
    except SerializationError as error:
        raise CliError(f"{what} is not valid JSON: {one_line(error)}") from None
    return data


def load_blueprint(ref: str, runtime: FlowRuntime) -> WorkflowBlueprint:
    """A blueprint from a JSON file, or the id of one of the app's blueprints; validated."""
    if not is_blueprint_file(ref):
        found = runtime.blueprints.get(ref)
        if found is None:
            known = ", ".join(sorted(runtime.blueprints)) or "none; pass --app"
            raise CliError(f"no blueprint file or known blueprint id {ref!r} (known ids: {known})")
        return found
    data = read_json_file(ref, "blueprint file")
    try:
        return WorkflowBlueprint.from_dict(data)
    except BlueprintError as error:
        raise CliError(f"invalid blueprint in {ref!r}: {'; '.join(one_line(p) for p in error.problems)}") from None


# --- JSON arguments ---------------------------------------------------------------------------


def parse_json_arg(value: Optional[str], option: str) -> Any:
    """A JSON value given inline, or `@path` to read it from a file; None when not given."""
    if value is None:
        return None
    if value.startswith("@"):
        return read_json_file(value[1:], f"{option} file")
    try:
        data = json.loads(value)
    except ValueError as error:
        raise CliError(f"{option} is not valid JSON ({one_line(error)}); quote a string as '\"text\"'") from None
    return _only_json(data, option, "$")


def parse_context(value: Optional[str]) -> dict:
    """The `--context` object (an empty dict when not given)."""
    data = parse_json_arg(value, "--context")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"--context must be a JSON object, not {type(data).__name__}")
    return data
