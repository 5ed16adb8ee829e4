"""User tools: plain ``async def`` functions in a Python module, offered to the voice agent.

    TOOLS_MODULE=mytools                       # an importable module name
    TOOLS_MODULE=./examples/order_tools.py     # or a path to a .py file (several: comma-separated)

Every public (no leading ``_``) ``async def`` defined in that module becomes a tool named after
it. Its docstring's first paragraph is the description the agent reads; a Google-style ``Args:``
section describes the parameters. The parameters' JSON Schema comes from the type hints:

    str -> string   int -> integer   float -> number (ints accepted)   bool -> boolean
    Literal["a", "b"] / Literal[1, 2] -> string / integer with an enum
    list[X] -> array of X            Optional[X] / X | None -> X or null

A parameter with a default is optional (the default is shown in the schema); one without is
required, even when it is ``Optional``: the agent must then send a value, which may be null.
A parameter named ``ctx`` is not in the schema: it receives a `ToolContext` (room, caller,
``play_cue``, ``end_call``, a logger, and in serve mode the dispatch's ``job_metadata``). A public ``async def`` with a missing hint, a missing
docstring or an unsupported type makes loading fail with one line naming it, so a typo never
silently drops a tool. Helpers are plain ``def``s or start with ``_``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import re
import sys
import traceback
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

__all__ = ["Tool", "ToolCallError", "ToolContext", "ToolError", "ToolFailed", "ToolRegistry", "load_tools",
           "make_tool", "tool_schema"]

log = logging.getLogger(__name__)

RESERVED_NAMES = frozenset({"end_call"})  # the worker's own tools
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what the Voice Agent API accepts
_SIMPLE: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_ARGS_HEADERS = ("Args:", "Arguments:", "Parameters:")
_SECTION = re.compile(r"(Args|Arguments|Parameters|Returns?|Yields?|Raises|Examples?|Notes?|Attributes|"
                      r"See Also|Todo|Warnings?):")
_ARG_LINE = re.compile(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")
_JSON_TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean",
                    "array": "an array", "object": "an object", "null": "null"}


class ToolError(Exception):
    """Tools cannot be loaded; str(e) is one line for the user naming the file, function or parameter."""


class ToolCallError(Exception):
    """A call cannot be made or its result cannot be sent; the message tells the agent what to fix."""


class ToolFailed(Exception):
    """Raise this from a tool to report a failure the agent may tell the caller about: its
    message goes back to the agent as the error. Any other exception is reported to the agent
    only as "the tool failed" (its text may hold hosts, paths or data the caller must not
    hear) and is logged by the worker."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON Schema object
    func: Callable[..., Awaitable[Any]]
    wants_ctx: bool

    def definition(self) -> dict[str, Any]:
        """The entry for ``session.tools``."""
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": copy.deepcopy(self.parameters)}


@dataclass
class ToolContext:
    """What a tool taking a ``ctx`` parameter receives. The worker makes one per call."""

    room_name: str
    user_identity: str | None  # the caller being listened to, if known
    call_id: str
    _play_cue: Callable[[str, float | None], Awaitable[bool]] = field(repr=False)
    _end_call: Callable[[str | None], Awaitable[None]] = field(repr=False)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__), repr=False)
    # Serve mode: the metadata of the dispatch that brought the agent to this room, as the
    # frontend or the backend set it (the user token's RoomAgentDispatch.metadata, or the
    # AgentDispatch API's): a string, often JSON (a customer id, a language, ...). Empty in
    # single-room mode and for automatic dispatch. It can hold personal data: not in repr.
    job_metadata: str = field(default="", repr=False)

    async def play_cue(self, clip: str, volume: float | None = None) -> bool:
        """Play a sound to the caller ("builtin:<name>" or a file path); return once it has played
        (False if it could not be played). `volume` is 0.0-1.0; None means the worker's cue volume."""
        if volume is not None and not 0.0 <= volume <= 1.0:
            raise ValueError(f"cue volume must be 0.0-1.0, not {volume!r}")
        return await self._play_cue(clip, volume)

    async def end_call(self, reason: str | None = None) -> None:
        """Hang up once the agent's current reply has played."""
        await self._end_call(reason)


# --------------------------------------------------------------------------------------------
# Schemas from functions
# --------------------------------------------------------------------------------------------


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _where(func: Callable[..., Any], name: str | None = None) -> str:
    code = getattr(inspect.unwrap(func), "__code__", None)
    at = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
    return f"tool {name or func.__name__}(){at}"


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return repr(hint).replace("typing.", "")


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if isinstance(schema["type"], list):
        return schema  # already nullable
    schema = dict(schema, type=[schema["type"], "null"])
    if "enum" in schema:
        schema["enum"] = [*schema["enum"], None]
    return schema


def _type_schema(hint: Any) -> dict[str, Any] | None:
    """The JSON Schema of one hint, or None if it is not supported."""
    if isinstance(hint, type) and hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        values = [a for a in args if a is not None]
        if values and all(type(v) is str for v in values):
            schema: dict[str, Any] = {"type": "string", "enum": values}
        elif values and all(type(v) is int for v in values):
            schema = {"type": "integer", "enum": values}
        else:
            return None  # mixed, bool or other literals
        return _nullable(schema) if len(values) < len(args) else schema
    if origin is list and len(args) == 1:
        items = _type_schema(args[0])
        return None if items is None else {"type": "array", "items": items}
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _type_schema(rest[0]) if len(rest) == 1 and len(args) == 2 else None
        return None if inner is None else _nullable(inner)
    return None


def _docstring(func: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(first paragraph, {parameter: text from the Args section})."""
    lines = (inspect.getdoc(func) or "").splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.fullmatch(line.strip()):
            break
        summary.append(line.strip())
    args: dict[str, str] = {}
    start = next((i for i, line in enumerate(lines) if line.strip() in _ARGS_HEADERS and not line[:1].isspace()), None)
    if start is not None:
        indent: int | None = None
        current: str | None = None
        for line in lines[start + 1:]:
            if not line.strip():
                continue
            depth = len(line) - len(line.lstrip())
            if depth == 0:
                break  # the next section
            indent = depth if indent is None else indent
            match = _ARG_LINE.fullmatch(line.strip())
            if depth <= indent and match:
                current = match.group(1)
                args[current] = match.group(2).strip()
            elif current is not None:
                args[current] = f"{args[current]} {line.strip()}".strip()
    return " ".join(summary), args


def _annotation(func: Callable[..., Any], param: inspect.Parameter) -> Any:
    hint = param.annotation
    if isinstance(hint, str):  # `from __future__ import annotations`
        hint = eval(hint, getattr(inspect.unwrap(func), "__globals__", {}))  # the user's own code, as typing would
    return hint


def _is_json_value(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def tool_schema(func: Callable[..., Any], *, name: str | None = None) -> dict[str, Any]:
    """The JSON Schema object of `func`'s parameters (without ``ctx``); raises ToolError."""
    where = _where(func, name)
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError) as e:
        raise ToolError(f"{where}: cannot read its signature: {_one_line(e)}") from None
    _, arg_docs = _docstring(func)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolError(f"{where}: *{param.name} / **{param.name} parameters are not supported; "
                            f"list each parameter with its type")
        if param.kind is param.POSITIONAL_ONLY:
            raise ToolError(f"{where}: parameter {param.name!r} is positional-only; tools are called by keyword")
        if param.name == "ctx":
            continue
        if param.annotation is param.empty:
            raise ToolError(f"{where}: parameter {param.name!r} has no type hint")
        try:
            hint = _annotation(func, param)
        except Exception as e:
            raise ToolError(f"{where}: parameter {param.name!r}: cannot resolve its type hint "
                            f"{param.annotation!r}: {type(e).__name__}: {_one_line(e)}") from None
        if hint is ToolContext:
            raise ToolError(f"{where}: the ToolContext parameter must be named 'ctx', not {param.name!r}")
        schema = _type_schema(hint)
        if schema is None:
            raise ToolError(f"{where}: parameter {param.name!r} has unsupported type {_type_name(hint)}; use str, "
                            f"int, float, bool, Literal[...] of str or int, list[...] or Optional[...] of these")
        if arg_docs.get(param.name):
            schema["description"] = arg_docs[param.name]
        if param.default is param.empty:
            required.append(param.name)
        elif not _is_json_value(param.default) or _value_problem(param.default, schema, param.name):
            raise ToolError(f"{where}: the default of parameter {param.name!r} ({param.default!r}) does not match "
                            f"its type {_type_name(hint)}" + (" (write `X | None = None`)" if param.default is None
                                                              else ""))
        else:
            schema["default"] = param.default
        properties[param.name] = schema
    stray = sorted(set(arg_docs) - set(properties) - {"ctx"})
    if stray:
        raise ToolError(f"{where}: its docstring's Args section describes {', '.join(map(repr, stray))}, "
                        f"which is not a parameter")
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    out["additionalProperties"] = False
    return out


def make_tool(func: Callable[..., Awaitable[Any]], name: str | None = None) -> Tool:
    """A `Tool` from an ``async def`` with type hints and a docstring; raises ToolError."""
    name = name or func.__name__
    where = _where(func, name)
    if not inspect.iscoroutinefunction(func):
        raise ToolError(f"{where}: a tool must be an `async def`")
    if not TOOL_NAME.fullmatch(name):
        raise ToolError(f"{where}: the name must be 1-64 ASCII letters, digits, '_' or '-'")
    description, _ = _docstring(func)
    if not description:
        raise ToolError(f"{where}: no docstring; its first paragraph is the description the agent reads")
    params = tool_schema(func, name=name)
    return Tool(name, description, params, func, "ctx" in inspect.signature(func).parameters)


# --------------------------------------------------------------------------------------------
# Loading modules
# --------------------------------------------------------------------------------------------


def _user_frame(tb: types.TracebackType | None) -> str:
    """file:line of the first frame in the user's code (not importlib, not this file)."""
    for frame in traceback.extract_tb(tb):
        if not frame.filename.startswith("<frozen") and frame.filename not in (__file__, importlib.__file__):
            return f" ({frame.filename}:{frame.lineno})"
    return ""


def _import_failure(spec: str, e: BaseException) -> ToolError:
    if isinstance(e, SyntaxError):
        return ToolError(f"syntax error in {e.filename}:{e.lineno}: {_one_line(e.msg)}")
    detail = _one_line(e) if str(e) else ""
    return ToolError(f"importing {spec} failed: {type(e).__name__}{': ' + detail if detail else ''}"
                     f"{_user_frame(e.__traceback__)}")


def _import_path(spec: str) -> tuple[types.ModuleType, types.ModuleType | None]:
    """The module and whatever it replaced in sys.modules (the same file loaded before)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ToolError(f"no such file: {spec}" if not path.exists() else f"not a file: {spec}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    name = f"_tools_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ToolError(f"not a Python file (.py): {spec}")
    module = importlib.util.module_from_spec(module_spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # what a module may raise: all are its failure
        _forget(module, previous)
        raise _import_failure(spec, e) from None
    return module, previous


def _forget(module: types.ModuleType, previous: types.ModuleType | None) -> None:
    if sys.modules.get(module.__name__) is module:
        if previous is None:
            del sys.modules[module.__name__]
        else:
            sys.modules[module.__name__] = previous


def _import_name(spec: str) -> types.ModuleType:
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name and (spec == e.name or spec.startswith(e.name + ".")):
            raise ToolError(f"no module named {spec!r} (give an importable module name or a path to a .py file)"
                            ) from None
        raise _import_failure(spec, e) from None
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # what a module may raise: all are its failure
        raise _import_failure(spec, e) from None


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec or spec.startswith(("~", "."))


def _module_tools(module: types.ModuleType) -> list[Tool]:
    found = [make_tool(obj, attr) for attr, obj in vars(module).items()
             if not attr.startswith("_") and inspect.iscoroutinefunction(obj)
             and getattr(obj, "__module__", None) == module.__name__]
    for tool in found:
        if tool.name in RESERVED_NAMES:
            raise ToolError(f"{_where(tool.func, tool.name)}: {tool.name!r} is a built-in tool of the worker; "
                            f"rename it")
    return found


def load_tools(spec: str) -> list[Tool]:
    """The tools of a module given by name or path (or several, comma-separated); raises ToolError.

    On failure, no module imported here by path is left in sys.modules."""
    tools: list[Tool] = []
    origin: dict[str, str] = {}
    imported: list[tuple[types.ModuleType, types.ModuleType | None]] = []
    try:
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                raise ToolError(f"empty module name or path in {spec!r}")
            if _is_path(part):
                imported.append(_import_path(part))
                module = imported[-1][0]
            else:
                module = _import_name(part)
            found = _module_tools(module)
            if not found:
                raise ToolError(f"{part} defines no tools: write a public `async def` with type hints and a docstring")
            for tool in found:
                if tool.name in origin:
                    raise ToolError(f"duplicate tool name {tool.name!r} in {origin[tool.name]} and {part}")
                origin[tool.name] = part
            tools += found
    except ToolError:
        for module, previous in reversed(imported):
            _forget(module, previous)
        raise
    return tools


# --------------------------------------------------------------------------------------------
# Calling
# --------------------------------------------------------------------------------------------


def _types_of(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type", [])
    return [kind] if isinstance(kind, str) else list(kind)


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    python = {"string": str, "boolean": bool, "array": list, "object": dict, "null": type(None)}.get(kind)
    return python is None or isinstance(value, python)


def _value_problem(value: Any, schema: dict[str, Any], where: str) -> str | None:
    kinds = _types_of(schema)
    if kinds and not any(_is_type(value, k) for k in kinds):
        return f"argument {where!r} must be {' or '.join(_JSON_TYPE_NAMES.get(k, k) for k in kinds)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"argument {where!r} must be one of {', '.join(json.dumps(v) for v in schema['enum'])}"
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problem = _value_problem(item, schema["items"], f"{where}[{i}]")
            if problem:
                return problem
    return None


def _arguments_problem(arguments: Any, schema: dict[str, Any]) -> str | None:
    if not isinstance(arguments, dict):
        return "arguments must be an object"
    properties: dict[str, Any] = schema.get("properties", {})
    unknown = [k for k in arguments if k not in properties]
    if unknown and schema.get("additionalProperties") is False:
        expected = ", ".join(properties) or "none"
        return f"unknown argument {unknown[0]!r}; the parameters are: {expected}"
    missing = [k for k in schema.get("required", ()) if k not in arguments]
    if missing:
        return f"missing required argument {missing[0]!r}"
    for key, value in arguments.items():
        problem = _value_problem(value, properties[key], key) if key in properties else None
        if problem:
            return problem
    return None


class ToolRegistry:
    """The tools of one worker, by name; validates the agent's arguments before calling."""

    def __init__(self, tools: list[Tool]) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise ToolError(f"duplicate tool name {tool.name!r}")
            self._tools[tool.name] = tool

    def definitions(self) -> list[dict[str, Any]]:
        return [tool.definition() for tool in self._tools.values()]

    def names(self) -> list[str]:
        return list(self._tools)

    async def call(self, name: str, arguments: dict[str, Any], ctx: ToolContext) -> Any:
        """Run a tool. Raises ToolCallError for an unknown tool, bad arguments or a result that is not
        JSON; the tool's own exceptions propagate unchanged."""
        tool = self._tools.get(name)
        if tool is None:
            raise ToolCallError(f"unknown tool {name!r}; the tools are: {', '.join(self._tools) or 'none'}")
        problem = _arguments_problem(arguments, tool.parameters)
        if problem:
            raise ToolCallError(problem)
        kwargs = dict(arguments)
        if tool.wants_ctx:
            kwargs["ctx"] = dataclasses.replace(ctx, log=logging.getLogger(f"{__name__}.{name}"))
        result = await tool.func(**kwargs)
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ToolCallError(f"tool {name!r} returned a {type(result).__name__} that is not JSON-serialisable: "
                                f"{_one_line(e)}") from None
        return result
