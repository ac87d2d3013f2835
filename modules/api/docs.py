"""`/docs`: the OpenAPI description as one self-contained HTML page.

FastAPI's Swagger UI loads its scripts from a CDN; Athanor's pages never reach the network, so the
docs are rendered here from the same OpenAPI schema (`/openapi.json`), with no script or remote asset.
"""
from __future__ import annotations

import html
import json
from typing import Any, Mapping

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin: 1.6em 0 .3em; font-family: ui-monospace, monospace; }
.m { display: inline-block; min-width: 4.2em; padding: 0 .3em; border-radius: 3px; color: #fff; text-align: center; }
.get { background: #2b7bb9; } .post { background: #2f9e44; } .delete { background: #c92a2a; } .put { background: #e67700; }
table { border-collapse: collapse; margin: .4em 0 1em; } td, th { border: 1px solid #ddd; padding: .2em .5em;
vertical-align: top; text-align: left; } code { font-family: ui-monospace, monospace; font-size: .92em; }
.toc { columns: 2; } .toc a { text-decoration: none; } .d { color: #555; }
"""


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type_text(schema: Mapping[str, Any]) -> str:
    if not schema:
        return "any"
    if "$ref" in schema:
        return _ref_name(schema["$ref"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return " | ".join(_type_text(s) for s in schema[key])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list[{_type_text(schema.get('items', {}))}]"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"dict[str, {_type_text(schema['additionalProperties'])}]"
    if "format" in schema and kind == "string":
        return f"string ({schema['format']})"
    return str(kind)


def _fields_table(schema: Mapping[str, Any], components: Mapping[str, Any]) -> str:
    if "$ref" in schema:
        schema = components.get(_ref_name(schema["$ref"]), {})
    properties = schema.get("properties")
    if not properties:
        return f"<p><code>{html.escape(_type_text(schema))}</code></p>"
    required = set(schema.get("required", ()))
    rows = []
    for name, field in properties.items():
        default = json.dumps(field["default"]) if "default" in field else ("required" if name in required else "")
        rows.append(f"<tr><td><code>{html.escape(name)}</code></td><td><code>{html.escape(_type_text(field))}</code>"
                    f"</td><td><code>{html.escape(default)}</code></td>"
                    f"<td>{html.escape(field.get('description', ''))}</td></tr>")
    return ("<table><tr><th>field</th><th>type</th><th>default</th><th>meaning</th></tr>" + "".join(rows)
            + "</table>")


def render_openapi_html(schema: Mapping[str, Any]) -> str:
    """The whole API as an HTML page: every operation with its parameters, body fields and responses."""
    components = schema.get("components", {}).get("schemas", {})
    title = html.escape(schema.get("info", {}).get("title", "API"))
    toc, sections = [], []
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            anchor = f"{method}-{path}".replace("/", "_").replace("{", "").replace("}", "")
            label = f"<span class='m {method}'>{method.upper()}</span> <code>{html.escape(path)}</code>"
            toc.append(f"<li><a href='#{anchor}'>{label}</a></li>")
            parts = [f"<h3 id='{anchor}'>{label}</h3>"]
            summary = op.get("summary") or ""
            if summary:
                parts.append(f"<p><b>{html.escape(summary)}</b></p>")
            if op.get("description"):
                parts.append(f"<p class='d'>{html.escape(op['description'])}</p>")
            params = [p for p in op.get("parameters", ()) if p.get("in") in ("path", "query")]
            if params:
                parts.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>default</th></tr>" + "".join(
                    f"<tr><td><code>{html.escape(p['name'])}</code></td><td>{p['in']}</td>"
                    f"<td><code>{html.escape(_type_text(p.get('schema', {})))}</code></td>"
                    f"<td><code>{html.escape(json.dumps(p.get('schema', {}).get('default', '')))}</code></td></tr>"
                    for p in params) + "</table>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:
                parts.append("<p>Request body (JSON):</p>" + _fields_table(body, components))
            for status, response in op.get("responses", {}).items():
                content = response.get("content", {})
                kinds = ", ".join(content) or "no body"
                shown = content.get("application/json", {}).get("schema")
                text = html.escape(_type_text(shown)) if shown else html.escape(kinds)
                parts.append(f"<p>{html.escape(str(status))}: <code>{text}</code></p>")
            sections.append("".join(parts))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title} API</title><style>{_STYLE}</style>"
            f"</head><body><h1>{title} API</h1><p>The machine-readable description is "
            f"<a href='/openapi.json'>/openapi.json</a>. Log in with HTTP Basic when the server has logins.</p>"
            f"<ul class='toc'>{''.join(toc)}</ul><h2>Operations</h2>{''.join(sections)}</body></html>")


def add_docs_route(server: Any) -> None:
    from fastapi.responses import HTMLResponse

    @server.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs() -> HTMLResponse:
        return HTMLResponse(render_openapi_html(server.openapi()))
