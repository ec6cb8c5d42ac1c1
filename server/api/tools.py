"""OpenAI tool calling on top of structured output.

The model answers with one JSON object, `{"name": <function>, "arguments": {...}}`, held to the tools'
parameter schemas by a grammar (as TGI does), so the arguments always parse and validate:

- `tool_choice` "required": one of the tools; a named function: that one;
- "auto" (the default with tools): one of the tools, or `{"name": "no_tool", "arguments": {"content": ...}}`
  when the model answers in words; that answer comes back as plain `content`;
- "none": no grammar, no tool calls (the tools are still shown to the model, as OpenAI does).

Templates that know `tools` get them through `apply_chat_template(tools=...)`; for the others a
short instruction with the tools' JSON is appended to the last user message (TGI's `tool_prompt`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from genserve.server.api.errors import validation_error
from genserve.server.grammar import GrammarSpec

NO_TOOL = "no_tool"
DEFAULT_TOOL_PROMPT = (
    'Answer with one JSON object that calls one of the functions below: '
    '{"name": <function name>, "arguments": {<argument name>: <value>, ...}}.'
)
# what the grammar makes a plain answer start with (fixed JSON layout, see grammar.JSON_LAYOUT)
NO_TOOL_PREFIX = f'{{"name": "{NO_TOOL}", "arguments": {{"content": "'
NO_TOOL_HINT = f' If no function fits, answer {{"name": "{NO_TOOL}", "arguments": {{"content": <your answer>}}}}.'


@dataclass(frozen=True, slots=True)
class ToolPlan:
    functions: list[dict]  # [{"name", "description", "parameters"}], as the client sent them
    choice: str  # "auto", "required" or "named"
    grammar: GrammarSpec | None  # None for tool_choice "none"

    @property
    def allows_text(self) -> bool:
        return self.choice == "auto"


def plan_tools(tools: list[Any] | None, tool_choice: Any) -> ToolPlan | None:
    """Check `tools` and `tool_choice` (422 on anything malformed) and build the grammar; None without tools."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise validation_error("`tool_choice` needs `tools`")
        return None
    functions = [_function(tool, i) for i, tool in enumerate(tools)]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise validation_error("`tools` has two functions with the same name")
    if tool_choice in (None, "auto"):
        choice, allowed = "auto", functions
    elif tool_choice == "none":
        return ToolPlan(functions, "none", None)
    elif tool_choice == "required":
        choice, allowed = "required", functions
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise validation_error(f"`tool_choice` names the function {name!r}, which is not in `tools`")
        choice, allowed = "named", [functions[names.index(name)]]
    else:
        raise validation_error('`tool_choice` must be "none", "auto", "required" or '
                               '{"type": "function", "function": {"name": ...}}')
    options = [_call_schema(f["name"], f["parameters"]) for f in allowed]
    if choice == "auto":
        text = {"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"],
                "additionalProperties": False}
        options.append(_call_schema(NO_TOOL, text))
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return ToolPlan(functions, choice, GrammarSpec.json_schema(schema))


def _function(tool: Any, index: int) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise validation_error(f'`tools[{index}]` must be {{"type": "function", "function": {{"name": ...}}}}')
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not name or name == NO_TOOL:
        raise validation_error(f"`tools[{index}].function.name` must be a non-empty string other than {NO_TOOL!r}")
    parameters = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise validation_error(f"`tools[{index}].function.parameters` must be a JSON schema object")
    return {"name": name, "description": fn.get("description") or "", "parameters": parameters}


def _call_schema(name: str, parameters: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_messages(messages: list[dict], plan: ToolPlan, tool_prompt: str | None, template: str) -> tuple[list[dict], dict]:
    """The messages and extra `apply_chat_template` kwargs that show the tools to the model."""
    tools = [{"type": "function", "function": f} for f in plan.functions]
    if "tools" in template:
        return messages, {"tools": tools}
    prompt = (tool_prompt or DEFAULT_TOOL_PROMPT) + (NO_TOOL_HINT if plan.allows_text else "")
    listing = json.dumps([{k: f[k] for k in ("name", "description", "parameters")} for f in plan.functions])
    messages = [dict(m) for m in messages]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    messages[last_user]["content"] = f"{messages[last_user]['content'] or ''}\n\n{prompt}\nFunctions: {listing}"
    return messages, {}


def history_message(role: str, content: str | None, tool_calls: list[Any] | None, template: str) -> dict:
    """An earlier assistant turn that called tools: structured for templates that know `tool_calls`,
    else the same JSON the model would have written."""
    calls = []
    for call in tool_calls or []:
        fn = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = fn.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            raise validation_error("`tool_calls[].function.arguments` must be a JSON string") from None
        calls.append({"name": fn.get("name"), "arguments": arguments})
    if "tool_calls" in template:
        return {"role": role, "content": content or "",
                "tool_calls": [{"type": "function", "function": c} for c in calls]}
    text = "\n".join(json.dumps(c) for c in calls)
    return {"role": role, "content": "\n".join(x for x in (content, text) if x)}


@dataclass(frozen=True, slots=True)
class ToolAnswer:
    content: str | None
    tool_calls: list[dict]


def parse_tool_output(text: str, plan: ToolPlan) -> ToolAnswer:
    """The generated JSON as OpenAI's message fields; text that is not a complete call stays content."""
    if plan.grammar is None:
        return ToolAnswer(text, [])
    try:
        call = json.loads(text)
        name, arguments = call["name"], call["arguments"]
    except (json.JSONDecodeError, KeyError, TypeError):  # cut short by max_tokens
        if text.startswith(NO_TOOL_PREFIX):  # a plain answer cut short: still just the answer
            return ToolAnswer(decode_partial_string(text[len(NO_TOOL_PREFIX):]), [])
        return ToolAnswer(text, [])
    if name == NO_TOOL:
        return ToolAnswer(arguments.get("content", ""), [])
    return ToolAnswer(None, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                              "function": {"name": name, "arguments": json.dumps(arguments)}}])


def decode_partial_string(raw: str) -> str:
    """The decoded text of a JSON string body that may be cut anywhere: up to its closing quote, or up
    to the last complete escape (never half a surrogate pair)."""
    end, i = len(raw), 0
    while i < len(raw):
        if raw[i] == '"':
            end = i
            break
        if raw[i] == "\\":
            if raw[i + 1:i + 2] != "u":
                size = 2
            else:  # \uXXXX, or two of them for a surrogate pair
                size = 12 if len(raw) >= i + 6 and 0xD800 <= int(raw[i + 2:i + 6], 16) <= 0xDBFF else 6
            if i + size > len(raw):
                end = i
                break
            i += size
            continue
        i += 1
    return json.loads('"' + raw[:end] + '"')


class PlainAnswerStream:
    """Streams `tool_choice: auto` answers that turn out to be plain text as they come; a tool call is
    held back until it is complete (its arguments only make sense whole)."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = ""

    def feed(self, delta: str) -> str:
        """The new content to send, "" while undecided or for a tool call."""
        self.text += delta
        if not self.text.startswith(NO_TOOL_PREFIX):
            return ""
        decoded = decode_partial_string(self.text[len(NO_TOOL_PREFIX):])
        new, self.sent = decoded[len(self.sent):], decoded
        return new

    @property
    def streaming(self) -> bool:
        return self.text.startswith(NO_TOOL_PREFIX)
