"""User tools (tools.py): schemas from type hints, descriptions from docstrings, loading errors,
argument validation, the example module, and the stand-in's acceptance of the definitions."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import standin

from tools import Tool, ToolCallError, ToolContext, ToolError, ToolRegistry, load_tools, make_tool, tool_schema

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "order_tools.py"


def write(tmp_path: Path, source: str, name: str = "mytools.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source).lstrip("\n"))
    return path


def load(tmp_path: Path, source: str, name: str = "mytools.py") -> dict[str, Tool]:
    return {t.name: t for t in load_tools(str(write(tmp_path, source, name)))}


def load_error(tmp_path: Path, source: str, name: str = "mytools.py") -> str:
    path = write(tmp_path, source, name)
    with pytest.raises(ToolError) as info:
        load_tools(str(path))
    message = str(info.value)
    assert "\n" not in message
    left = [name for name, m in list(sys.modules.items()) if getattr(m, "__file__", None) == str(path)]
    assert not left, "a half-imported module was left in sys.modules"
    return message


class Calls:
    """Fake worker hooks for a ToolContext."""

    def __init__(self) -> None:
        self.cues: list[tuple[str, float | None]] = []
        self.ended: list[str | None] = []

    async def play_cue(self, clip: str, volume: float | None) -> bool:
        self.cues.append((clip, volume))
        return True

    async def end_call(self, reason: str | None) -> None:
        self.ended.append(reason)

    def ctx(self, call_id: str = "call-1") -> ToolContext:
        return ToolContext("room-1", "alice", call_id, self.play_cue, self.end_call)


def accepted_by_standin(definitions: list[dict[str, Any]]) -> None:
    standin.validate_update({"tools": definitions}, {}, ready=False, voices=("ivy",), known_agents=())


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------

ALL_TYPES = """
    {future}
    from typing import Literal, Optional

    async def everything(s: str, i: int, x: float, b: bool, color: Literal["red", "green"],
                         n: Literal[1, 2, 3], tags: list[str], ids: list[int], maybe: Optional[str],
                         maybe_int: int | None, grid: list[list[float]], kinds: list[Literal["a", "b"]],
                         opt: str = "hi", flag: bool = False, limit: int = 10,
                         nothing: float | None = None, pick: Literal["x", "y"] | None = None) -> dict:
        \"\"\"Take every supported type.\"\"\"
        return {{}}
"""

ALL_TYPES_SCHEMA = {
    "type": "object",
    "properties": {
        "s": {"type": "string"},
        "i": {"type": "integer"},
        "x": {"type": "number"},
        "b": {"type": "boolean"},
        "color": {"type": "string", "enum": ["red", "green"]},
        "n": {"type": "integer", "enum": [1, 2, 3]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "ids": {"type": "array", "items": {"type": "integer"}},
        "maybe": {"type": ["string", "null"]},
        "maybe_int": {"type": ["integer", "null"]},
        "grid": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "kinds": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
        "opt": {"type": "string", "default": "hi"},
        "flag": {"type": "boolean", "default": False},
        "limit": {"type": "integer", "default": 10},
        "nothing": {"type": ["number", "null"], "default": None},
        "pick": {"type": ["string", "null"], "enum": ["x", "y", None], "default": None},
    },
    "required": ["s", "i", "x", "b", "color", "n", "tags", "ids", "maybe", "maybe_int", "grid", "kinds"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("future", ["", "from __future__ import annotations"])
def test_schema_is_exactly_what_the_hints_say(tmp_path: Path, future: str) -> None:
    tool = load(tmp_path, ALL_TYPES.format(future=future))["everything"]
    assert tool.parameters == ALL_TYPES_SCHEMA
    assert tool.definition() == {"type": "function", "name": "everything",
                                 "description": "Take every supported type.", "parameters": ALL_TYPES_SCHEMA}
    assert not tool.wants_ctx
    accepted_by_standin([tool.definition()])


def test_no_parameters(tmp_path: Path) -> None:
    tool = load(tmp_path, '''
        async def ping() -> str:
            """Check the line."""
            return "pong"
    ''')["ping"]
    assert tool.parameters == {"type": "object", "properties": {}, "additionalProperties": False}


def test_tool_schema_on_its_own() -> None:
    def plain(city: str, days: int = 3, ctx: Any = None) -> None:  # sync, no docstring: schema only
        pass

    assert tool_schema(plain) == {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "default": 3}},
        "required": ["city"],
        "additionalProperties": False,
    }


def test_definition_is_a_copy(tmp_path: Path) -> None:
    tool = load(tmp_path, ALL_TYPES.format(future=""))["everything"]
    tool.definition()["parameters"]["properties"].clear()
    assert tool.parameters == ALL_TYPES_SCHEMA


def test_descriptions_from_docstring_and_args(tmp_path: Path) -> None:
    tool = load(tmp_path, '''
        async def book_table(name: str, guests: int, when: str | None = None) -> dict:
            """Book a table at the restaurant
            for tonight or another day.

            Only for parties of up to eight; larger groups must email.

            Args:
                name (str): The name the booking is under.
                guests: How many people, children
                    included.
                when: The day, e.g. "tomorrow"; none means tonight.

            Returns:
                The booking reference.
            """
            return {}
    ''')["book_table"]
    assert tool.description == "Book a table at the restaurant for tonight or another day."
    assert tool.parameters["properties"] == {
        "name": {"type": "string", "description": "The name the booking is under."},
        "guests": {"type": "integer", "description": "How many people, children included."},
        "when": {"type": ["string", "null"], "description": 'The day, e.g. "tomorrow"; none means tonight.',
                 "default": None},
    }


def test_args_section_may_skip_parameters(tmp_path: Path) -> None:
    tool = load(tmp_path, '''
        async def f(a: str, b: str) -> None:
            """Do it.

            Args:
                a: First.
            """
    ''')["f"]
    assert tool.parameters["properties"] == {"a": {"type": "string", "description": "First."}, "b": {"type": "string"}}


# --------------------------------------------------------------------------------------------
# What is (not) a tool
# --------------------------------------------------------------------------------------------


def test_only_public_async_defs_defined_in_the_module(tmp_path: Path) -> None:
    tools_found = load(tmp_path, '''
        from asyncio import sleep            # an async def imported from elsewhere: not a tool
        from dataclasses import dataclass

        @dataclass
        class Order:                          # needs the module in sys.modules while loading
            id: str

        def helper(x):                        # sync, no hints, no docstring: not a tool
            return x

        async def _private(x):                # private: not a tool even without hints
            return x

        async def public(order_id: str) -> str:
            """The only tool."""
            return Order(order_id).id
    ''')
    assert list(tools_found) == ["public"]


def test_loading_twice_and_by_module_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = '''
        async def hello(name: str) -> str:
            """Say hello."""
            return f"hello {name}"
    '''
    assert list(load(tmp_path, source)) == ["hello"]
    assert list(load(tmp_path, source)) == ["hello"]
    write(tmp_path, source, "tools_by_name_xyz.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    [tool] = load_tools("tools_by_name_xyz")
    assert tool.name == "hello"
    monkeypatch.delitem(sys.modules, "tools_by_name_xyz")


async def test_several_modules_comma_separated(tmp_path: Path) -> None:
    a = write(tmp_path, '''
        async def one() -> int:
            """One."""
            return 1
    ''', "a.py")
    b = write(tmp_path, '''
        async def two() -> int:
            """Two."""
            return 2
    ''', "b.py")
    assert [t.name for t in load_tools(f"{a}, {b}")] == ["one", "two"]


# --------------------------------------------------------------------------------------------
# Loading errors: one line each, naming what to fix
# --------------------------------------------------------------------------------------------


def test_missing_module_name() -> None:
    with pytest.raises(ToolError, match=r"^no module named 'no_such_tools_module_xyz' \(give an importable"):
        load_tools("no_such_tools_module_xyz")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="^no such file: .*nope.py$"):
        load_tools(str(tmp_path / "nope.py"))
    with pytest.raises(ToolError, match="^not a file: "):
        load_tools(str(tmp_path) + "/")


def test_not_a_python_file(tmp_path: Path) -> None:
    path = tmp_path / "tools.txt"
    path.write_text("x = 1\n")
    with pytest.raises(ToolError, match=r"^not a Python file \(\.py\)"):
        load_tools(str(path))


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    message = load_error(tmp_path, '''
        async def ok() -> None:
            """Fine."""
        async def broken(x: str) -> None
            """Missing colon."""
    ''')
    assert message.startswith(f"syntax error in {tmp_path / 'mytools.py'}:3: ")


def test_exception_at_import_names_it_and_the_line(tmp_path: Path) -> None:
    message = load_error(tmp_path, '''
        import json
        CONFIG = json.loads("{not json")
    ''')
    assert message.startswith(f"importing {tmp_path / 'mytools.py'} failed: JSONDecodeError: ")
    assert message.endswith(f"({tmp_path / 'mytools.py'}:2)")


def test_missing_dependency_is_an_import_failure_not_a_missing_module(tmp_path: Path) -> None:
    message = load_error(tmp_path, "import no_such_dependency_xyz\n")
    assert "ModuleNotFoundError: No module named 'no_such_dependency_xyz'" in message
    assert message.endswith(":1)")


def test_exception_at_import_by_module_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, 'raise RuntimeError("no API key")\n', "failing_tools_xyz.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ToolError) as info:
        load_tools("failing_tools_xyz")
    assert str(info.value) == (f"importing failing_tools_xyz failed: RuntimeError: no API key "
                               f"({tmp_path / 'failing_tools_xyz.py'}:1)")
    assert "failing_tools_xyz" not in sys.modules


def test_exit_at_import_is_caught(tmp_path: Path) -> None:
    assert "SystemExit: 2" in load_error(tmp_path, "import sys\nsys.exit(2)\n")


BAD_TOOLS = [
    pytest.param('''
        async def lookup(order_id: str) -> dict:
            return {}
    ''', "tool lookup() ({path}:1): no docstring; its first paragraph is the description the agent reads",
                 id="no docstring"),
    pytest.param('''
        async def lookup(order_id: str) -> dict:
            """"""
    ''', "tool lookup() ({path}:1): no docstring", id="empty docstring"),
    pytest.param('''
        async def lookup(order_id) -> dict:
            """Look up."""
    ''', "tool lookup() ({path}:1): parameter 'order_id' has no type hint", id="no hint"),
    pytest.param('''
        async def lookup(filters: dict[str, int]) -> dict:
            """Look up."""
    ''', "tool lookup() ({path}:1): parameter 'filters' has unsupported type dict[str, int]; use str, int, float, "
         "bool, Literal[...] of str or int, list[...] or Optional[...] of these", id="dict"),
    pytest.param('''
        async def lookup(ids: list) -> dict:
            """Look up."""
    ''', "parameter 'ids' has unsupported type list;", id="bare list"),
    pytest.param('''
        async def lookup(key: int | str) -> dict:
            """Look up."""
    ''', "parameter 'key' has unsupported type int | str;", id="union"),
    pytest.param('''
        from typing import Literal
        async def lookup(key: Literal["a", 1]) -> dict:
            """Look up."""
    ''', "parameter 'key' has unsupported type Literal['a', 1];", id="mixed literal"),
    pytest.param('''
        async def lookup(when: "Datetime") -> dict:
            """Look up."""
    ''', "parameter 'when': cannot resolve its type hint 'Datetime': NameError: name 'Datetime' is not defined",
                 id="unresolvable hint"),
    pytest.param('''
        async def lookup(*ids: str) -> dict:
            """Look up."""
    ''', "*ids / **ids parameters are not supported", id="varargs"),
    pytest.param('''
        async def lookup(note: str = None) -> dict:
            """Look up."""
    ''', "the default of parameter 'note' (None) does not match its type str (write `X | None = None`)",
                 id="default None without Optional"),
    pytest.param('''
        async def lookup(order_id: str) -> dict:
            """Look up.

            Args:
                orderid: The id.
            """
    ''', "its docstring's Args section describes 'orderid', which is not a parameter", id="Args typo"),
    pytest.param('''
        from tools import ToolContext
        async def lookup(order_id: str, context: ToolContext) -> dict:
            """Look up."""
    ''', "the ToolContext parameter must be named 'ctx', not 'context'", id="ToolContext not ctx"),
    pytest.param('''
        async def end_call(reason: str) -> None:
            """Hang up."""
    ''', "tool end_call() ({path}:1): 'end_call' is a built-in tool of the worker; rename it", id="end_call"),
    pytest.param('''
        def helper() -> None:
            pass
        async def _private() -> None:
            pass
    ''', "{path} defines no tools: write a public `async def` with type hints and a docstring", id="no tools"),
]


@pytest.mark.parametrize(("source", "expected"), BAD_TOOLS)
def test_bad_tool_definitions(tmp_path: Path, source: str, expected: str) -> None:
    message = load_error(tmp_path, source)
    assert expected.format(path=tmp_path / "mytools.py") in message


def test_duplicate_names_across_modules(tmp_path: Path) -> None:
    source = '''
        async def lookup(order_id: str) -> dict:
            """Look up."""
    '''
    a, b = write(tmp_path, source, "a.py"), write(tmp_path, source, "b.py")
    with pytest.raises(ToolError, match=f"^duplicate tool name 'lookup' in {a} and {b}$"):
        load_tools(f"{a},{b}")
    with pytest.raises(ToolError, match="^duplicate tool name 'lookup'$"):
        ToolRegistry(load_tools(str(a)) + load_tools(str(b)))


def test_empty_spec() -> None:
    with pytest.raises(ToolError, match="^empty module name or path"):
        load_tools(" ")


# --------------------------------------------------------------------------------------------
# Calling
# --------------------------------------------------------------------------------------------

CALLABLE = '''
    from typing import Literal
    from tools import ToolContext

    async def lookup(order_id: str, count: int = 1, weight: float = 1.0, gift: bool = False,
                     country: Literal["FR", "DE"] = "FR", ids: list[int] = [], note: str | None = None) -> dict:
        """Echo the arguments."""
        return {"order_id": order_id, "count": count, "weight": weight, "gift": gift, "country": country,
                "ids": ids, "note": note}

    async def with_ctx(ctx: ToolContext, text: str) -> dict:
        """Use the context."""
        played = await ctx.play_cue("builtin:thinking", 0.5)
        await ctx.end_call("done")
        return {"room": ctx.room_name, "user": ctx.user_identity, "call": ctx.call_id, "log": ctx.log.name,
                "played": played, "text": text}

    async def bare_ctx(ctx) -> str:
        """Context without a hint."""
        return ctx.call_id

    async def not_json() -> object:
        """Return something JSON cannot encode."""
        return {"when": object()}

    async def nan() -> float:
        """Return NaN."""
        return float("nan")

    async def fails(order_id: str) -> None:
        """Raise."""
        raise LookupError(f"order {order_id} is archived")
'''


@pytest.fixture
def registry(tmp_path: Path) -> ToolRegistry:
    return ToolRegistry(load_tools(str(write(tmp_path, CALLABLE))))


def test_registry_definitions_and_names(registry: ToolRegistry) -> None:
    assert registry.names() == ["lookup", "with_ctx", "bare_ctx", "not_json", "nan", "fails"]
    assert [d["name"] for d in registry.definitions()] == registry.names()
    assert registry.definitions()[1]["parameters"] == {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
        "additionalProperties": False}
    accepted_by_standin(registry.definitions())


async def test_call_passes_arguments(registry: ToolRegistry) -> None:
    result = await registry.call("lookup", {"order_id": "A1", "weight": 2, "ids": [1, 2], "note": None},
                                 Calls().ctx())
    assert result == {"order_id": "A1", "count": 1, "weight": 2, "gift": False, "country": "FR", "ids": [1, 2],
                      "note": None}


async def test_ctx_is_injected(registry: ToolRegistry) -> None:
    calls = Calls()
    result = await registry.call("with_ctx", {"text": "hi"}, calls.ctx("call-7"))
    assert result == {"room": "room-1", "user": "alice", "call": "call-7", "log": "tools.with_ctx",
                      "played": True, "text": "hi"}
    assert calls.cues == [("builtin:thinking", 0.5)]
    assert calls.ended == ["done"]
    assert await registry.call("bare_ctx", {}, calls.ctx("call-8")) == "call-8"


@pytest.mark.parametrize(("name", "arguments", "message"), [
    ("nope", {}, "unknown tool 'nope'; the tools are: lookup, with_ctx, bare_ctx, not_json, nan, fails"),
    ("lookup", [], "arguments must be an object"),
    ("lookup", {}, "missing required argument 'order_id'"),
    ("lookup", {"orderId": "A1"},
     "unknown argument 'orderId'; the parameters are: order_id, count, weight, gift, country, ids, note"),
    ("with_ctx", {"text": "x", "ctx": 1}, "unknown argument 'ctx'; the parameters are: text"),
    ("lookup", {"order_id": 42}, "argument 'order_id' must be a string"),
    ("lookup", {"order_id": None}, "argument 'order_id' must be a string"),
    ("lookup", {"order_id": "A1", "count": True}, "argument 'count' must be an integer"),
    ("lookup", {"order_id": "A1", "count": 1.5}, "argument 'count' must be an integer"),
    ("lookup", {"order_id": "A1", "weight": "2"}, "argument 'weight' must be a number"),
    ("lookup", {"order_id": "A1", "weight": False}, "argument 'weight' must be a number"),
    ("lookup", {"order_id": "A1", "gift": 1}, "argument 'gift' must be a boolean"),
    ("lookup", {"order_id": "A1", "country": "GB"}, 'argument \'country\' must be one of "FR", "DE"'),
    ("lookup", {"order_id": "A1", "ids": 3}, "argument 'ids' must be an array"),
    ("lookup", {"order_id": "A1", "ids": [1, "2"]}, "argument 'ids[1]' must be an integer"),
    ("lookup", {"order_id": "A1", "note": 3}, "argument 'note' must be a string or null"),
])
async def test_argument_errors(registry: ToolRegistry, name: str, arguments: Any, message: str) -> None:
    with pytest.raises(ToolCallError) as info:
        await registry.call(name, arguments, Calls().ctx())
    assert str(info.value) == message


async def test_result_must_be_json(registry: ToolRegistry) -> None:
    with pytest.raises(ToolCallError, match="^tool 'not_json' returned a dict that is not JSON-serialisable: "):
        await registry.call("not_json", {}, Calls().ctx())
    with pytest.raises(ToolCallError, match="^tool 'nan' returned a float that is not JSON-serialisable: "):
        await registry.call("nan", {}, Calls().ctx())


async def test_tool_exceptions_propagate_unchanged(registry: ToolRegistry) -> None:
    with pytest.raises(LookupError, match="^order A1 is archived$"):
        await registry.call("fails", {"order_id": "A1"}, Calls().ctx())


async def test_cue_volume_is_checked() -> None:
    with pytest.raises(ValueError, match="0.0-1.0"):
        await Calls().ctx().play_cue("builtin:thinking", 1.5)


async def test_make_tool_directly() -> None:
    async def greet(name: str) -> str:
        """Greet someone."""
        return f"hi {name}"

    def sync(name: str) -> str:
        """Not async."""
        return name

    registry = ToolRegistry([make_tool(greet)])
    assert await registry.call("greet", {"name": "Bo"}, Calls().ctx()) == "hi Bo"
    with pytest.raises(ToolError, match=r"^tool sync\(\) \(.*\): a tool must be an `async def`$"):
        make_tool(sync)


# --------------------------------------------------------------------------------------------
# The example module
# --------------------------------------------------------------------------------------------


@pytest.fixture
def example() -> ToolRegistry:
    return ToolRegistry(load_tools(str(EXAMPLE)))


def test_example_loads_and_is_accepted(example: ToolRegistry) -> None:
    assert example.names() == ["lookup_order", "delivery_options", "transfer_to_human"]
    lookup = example.definitions()[0]
    assert lookup["description"] == "Look up an order by its id and return its status, items and delivery date."
    assert lookup["parameters"]["required"] == ["order_id"]
    accepted_by_standin(example.definitions())
    assert json.loads((EXAMPLE.parent / "orders.json").read_text())  # valid JSON


def test_example_loads_by_relative_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert load_tools("examples/order_tools.py")[0].name == "lookup_order"
    assert load_tools("./examples/order_tools.py")[0].name == "lookup_order"


async def test_example_lookup_order(example: ToolRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # orders.json is found next to the module, not in the working directory
    found = await example.call("lookup_order", {"order_id": "a 1001"}, Calls().ctx())
    assert found == {"found": True, "order_id": "A1001", "status": "shipped", "items": ["blue kettle", "two mugs"],
                     "delivery_date": "2025-06-12", "carrier": "DHL"}
    assert await example.call("lookup_order", {"order_id": "Z9999"}, Calls().ctx()) == {"found": False}


async def test_example_delivery_options(example: ToolRegistry) -> None:
    assert await example.call("delivery_options", {"country": "DE", "express_only": True}, Calls().ctx()) == [
        "express (next day)"]
    with pytest.raises(ToolCallError, match="must be one of"):
        await example.call("delivery_options", {"country": "ES"}, Calls().ctx())


async def test_example_transfer_to_human(example: ToolRegistry) -> None:
    calls = Calls()
    assert await example.call("transfer_to_human", {"reason": "refund"}, calls.ctx()) == {"callback_requested": True}
    [(clip, volume)] = calls.cues
    assert Path(clip) == EXAMPLE.parent / "chime.wav" and volume is None
    assert calls.ended == ["transferred to a human"]


def test_example_chime_is_playable() -> None:
    import sounds

    sound = sounds.load(str(EXAMPLE.parent / "chime.wav"))
    assert 0.3 < len(sound.samples) / sounds.SAMPLE_RATE < 1.0

