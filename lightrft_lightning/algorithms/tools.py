"""Tools for multi-turn episodes: plain Python callables, their JSON schemas, tool-call parsing and
calls that answer every failure (an exception, a timeout, bad arguments, a malformed call) with an
error text instead of raising.

The call format is Hermes' (Qwen2.5, SmolLM3, most open chat templates with tools): the model writes
``<tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}</tool_call>``, one block per
call; the result comes back as a ``{"role": "tool", "name": ..., "content": ...}`` message.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)

#: the system text that offers tools when the chat template does not take ``tools=`` (documented format)
TOOL_PROMPT = ("You can call tools. To call one, write <tool_call>{{\"name\": <tool name>, \"arguments\": {{<argument "
               "name>: <value>}}}}</tool_call>; its result comes back in a tool message. Tools (JSON schemas):\n"
               "{schemas}")


def tool_schema(fn: Callable) -> dict[str, Any]:
    """The JSON schema of ``fn`` (transformers' ``get_json_schema``: type hints and a Google-style
    docstring with an ``Args:`` section), as chat templates take it."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as err:  # transformers raises its own DocstringParsingException / TypeHintParsingException
        raise ValueError(f"tool {getattr(fn, '__name__', fn)!r} has no usable schema ({err}); accepted: a function "
                         "with type hints and a docstring describing each argument under 'Args:'") from err


@dataclass
class ToolCall:
    """One parsed call: the tool's name and arguments, or ``error`` when the block did not parse."""

    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>`` block of ``text`` (an unclosed last one included), in order."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            value = json.loads(body.strip())
        except json.JSONDecodeError as err:
            calls.append(ToolCall(error=f"the tool call is not valid JSON ({err.msg})"))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            calls.append(ToolCall(error="the tool call has no 'name' string"))
            continue
        arguments = value.get("arguments", {})
        if not isinstance(arguments, dict):
            calls.append(ToolCall(name=value["name"], error="the tool call's 'arguments' is not an object"))
            continue
        calls.append(ToolCall(value["name"], arguments))
    return calls


def call_tool(tools: dict[str, Callable], call: ToolCall, timeout_s: float) -> tuple[str, bool]:
    """``(result text, failed)``: the tool's result as text, or an error text when the call did not
    parse, names no tool, has arguments the function does not take, raises, or runs past
    ``timeout_s`` (the call's daemon thread is then abandoned: a tool that never returns keeps it)."""
    if call.error is not None:
        return f"error: {call.error}", True
    fn = tools.get(call.name)
    if fn is None:
        return f"error: no tool named {call.name!r}; accepted: {sorted(tools)}", True
    try:
        inspect.signature(fn).bind(**call.arguments)
    except TypeError as err:
        return f"error: bad arguments for {call.name}: {err}", True
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(**call.arguments)
        except Exception as err:  # the episode goes on: the model reads the error
            box["error"] = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=run, name=f"tool-{call.name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return f"error: {call.name} timed out after {timeout_s:g} s", True
    if "error" in box:
        return f"error: {box['error']}", True
    result = box.get("result")
    return (result if isinstance(result, str) else json.dumps(result, default=str)), False


def tool_system_text(tools: Sequence[Callable]) -> str:
    """The documented-format offer of ``tools`` (for templates without ``tools=``)."""
    return TOOL_PROMPT.format(schemas="\n".join(json.dumps(tool_schema(fn)) for fn in tools))
