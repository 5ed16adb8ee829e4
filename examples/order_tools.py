"""Example tools for a shop's phone line. Copy this file and change it.

Run the worker with them:

    TOOLS_MODULE=examples/order_tools.py python worker.py

How a tool is written
---------------------
* Every public ``async def`` in this file is a tool, named after the function. Helpers are plain
  ``def``s or have a name starting with ``_`` (like ``_load_orders`` below).
* Every parameter needs a type hint: str, int, float, bool, Literal[...], list[...] or
  ``X | None``. They become the JSON Schema the agent fills in. A parameter with a default is
  optional.
* The docstring's first paragraph is what the agent reads to decide WHEN to call the tool: say
  what it does and when to use it. The ``Args:`` lines describe each parameter to the agent.
* Return something JSON can encode (dict, list, str, number, bool, None). The agent reads it
  and answers the caller in its own words. Raise ``ToolFailed("...")`` to report a failure the
  agent may tell the caller about; any other exception reaches the agent only as "the tool
  failed" (its text stays in the worker's log).
* A parameter named ``ctx`` is not shown to the agent: it receives a ``ToolContext`` with the
  room name, the caller's identity, ``play_cue`` (play a sound), ``end_call`` (hang up after
  the current reply) and ``log`` (a logger named ``tools.<tool name>``).
* A call must finish within the worker's tool timeout (20 s by default); while it runs the
  caller hears the thinking sound, if THINKING_SOUND is set.

For the first tool below, the agent sees this in ``session.tools``:

    {"type": "function", "name": "lookup_order",
     "description": "Look up an order by its id and return its status, items and delivery date.",
     "parameters": {"type": "object",
                    "properties": {"order_id": {"type": "string",
                                                "description": "The order number the caller reads out, ..."}},
                    "required": ["order_id"], "additionalProperties": false}}
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Literal

from tools import ToolContext

HERE = Path(__file__).resolve().parent  # files next to this module, wherever it is run from
ORDERS_FILE = HERE / "orders.json"
CHIME = HERE / "chime.wav"

DELIVERY: dict[str, list[str]] = {
    "FR": ["standard (3-5 days)", "express (next day)", "pick-up point"],
    "DE": ["standard (3-5 days)", "express (next day)"],
    "GB": ["standard (5-7 days)"],
    "US": ["standard (7-10 days)", "air (3 days)"],
}


def _load_orders() -> dict[str, Any]:
    return json.loads(ORDERS_FILE.read_text(encoding="utf-8"))


async def lookup_order(order_id: str) -> dict[str, Any]:
    """Look up an order by its id and return its status, items and delivery date.

    Args:
        order_id: The order number the caller reads out, e.g. "A1001". Spaces and case
            do not matter.
    """
    # A real tool would call an API here (with an async client such as httpx.AsyncClient).
    # Blocking work goes to a thread so the audio keeps flowing meanwhile.
    orders = await asyncio.to_thread(_load_orders)
    key = "".join(order_id.split()).upper()  # "a 1001" as transcribed -> "A1001"
    order = orders.get(key)
    if order is None:
        return {"found": False}
    return {"found": True, "order_id": key, **order}


async def delivery_options(country: Literal["FR", "DE", "GB", "US"], express_only: bool = False) -> list[str]:
    """List the delivery options we offer for a country. We only ship to France, Germany, the UK and the US.

    Args:
        country: The destination country as an ISO code.
        express_only: Only list the options faster than standard delivery.
    """
    options = DELIVERY[country]
    return [o for o in options if not o.startswith("standard")] if express_only else options


async def transfer_to_human(reason: str, ctx: ToolContext) -> dict[str, Any]:
    """Ask a member of staff to call the customer back, then end this call. Use it when the caller
    asks for a person, or when you cannot help after two attempts. Tell the caller someone will
    call them back today before calling this tool.

    Args:
        reason: One sentence for the staff member: what the caller needs.
    """
    # A real tool would create a ticket here; this one only logs the request.
    ctx.log.info("callback requested by %s in room %s: %s", ctx.user_identity, ctx.room_name, reason)
    await ctx.play_cue(str(CHIME))  # returns once the chime has played
    await ctx.end_call("transferred to a human")  # hangs up after the agent's current reply
    return {"callback_requested": True}
