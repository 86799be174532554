"""MkDocs hook: the HTTP API page (docs/reference/http.md) from the server's own OpenAPI schema.

At build time the schema comes from ``tamis.server.app.create_app({}, {}).openapi()`` (no model is loaded), so the
page cannot drift from the routes; the schema itself is also published as ``reference/openapi.json``. A route or
field that cannot be rendered fails the build (``mkdocs build --strict`` in CI).
"""

from __future__ import annotations

import json
from typing import Any

PAGE = "reference/http.md"
MARKER = "<!-- openapi -->"
METHODS = ("get", "post", "put", "patch", "delete")


def _schema() -> dict[str, Any]:
    from tamis.server.app import create_app

    return create_app({}, {}).openapi()


def _cell(text: Any) -> str:
    """One Markdown table cell: no line breaks, no bare pipes; reST ``literals`` as Markdown code."""
    s = " ".join(str(text).split())
    return s.replace("``", "`").replace("|", "\\|")


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(s: dict[str, Any]) -> str:
    """A short, readable type: `string`, `integer or null`, `list of string`, a link to a schema, an enum."""
    if "$ref" in s:
        name = _ref_name(s["$ref"])
        return f"[{name}](#{name.lower()})"
    if "anyOf" in s or "oneOf" in s:
        parts = [_type(x) for x in s.get("anyOf", s.get("oneOf", []))]
        return " or ".join(dict.fromkeys(parts))
    if "enum" in s:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in s["enum"])
    if "const" in s:
        return f"`{json.dumps(s['const'])}`"
    t = s.get("type")
    if t == "array":
        return f"list of {_type(s.get('items', {}))}" if s.get("items") else "list"
    if t == "object" and "properties" in s:
        req = set(s.get("required", []))
        inner = ", ".join(f"{k}{'' if k in req else '?'}: {_type(v)}" for k, v in s["properties"].items())
        return "{" + inner + "}"
    if t == "object" and isinstance(s.get("additionalProperties"), dict):
        return f"map of {_type(s['additionalProperties'])}"
    if isinstance(t, list):
        return " or ".join(t)
    return t or "any"


def _content_type(content: dict[str, Any]) -> str:
    out = []
    for mime, body in content.items():
        schema = body.get("schema", {})
        out.append(f"{_type(schema)} ({mime})" if mime != "application/json" else _type(schema))
    return "; ".join(out)


def render(schema: dict[str, Any]) -> str:
    lines: list[str] = []
    info = schema.get("info", {})
    if info.get("description"):
        lines += [_cell(info["description"]), ""]
    lines += [f"OpenAPI {schema.get('openapi', '')}, API version {info.get('version', '')}. "
              "The raw schema: [openapi.json](openapi.json).", "", "## Routes", ""]
    lines += ["| method | path | summary |", "|---|---|---|"]
    ops = []
    for path, item in schema["paths"].items():
        for method in METHODS:
            if method in item:
                op = item[method]
                anchor = f"{method}-{path}".lower().replace("/", "-").replace("{", "").replace("}", "").strip("-")
                anchor = "-".join(p for p in anchor.split("-") if p)
                ops.append((method, path, op, anchor))
                lines.append(f"| `{method.upper()}` | [`{path}`](#{anchor}) | {_cell(op.get('summary', ''))} |")
    lines.append("")
    for method, path, op, anchor in ops:
        lines += [f"### `{method.upper()} {path}` {{#{anchor}}}", ""]
        if op.get("summary"):
            lines += [_cell(op["summary"]) + ".", ""]
        if op.get("description"):
            lines += [op["description"].replace("``", "`").strip(), ""]
        params = op.get("parameters", [])
        if params:
            lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
            for p in params:
                lines.append(f"| `{p['name']}` | {p.get('in', '')} | {_type(p.get('schema', {}))} | "
                             f"{'yes' if p.get('required') else 'no'} | {_cell(p.get('description', ''))} |")
            lines.append("")
        body = op.get("requestBody")
        if body:
            lines += [f"Request body: {_content_type(body.get('content', {}))}.", ""]
        lines += ["| status | meaning | body |", "|---|---|---|"]
        for status, resp in op.get("responses", {}).items():
            lines.append(f"| {status} | {_cell(resp.get('description', ''))} | "
                         f"{_content_type(resp.get('content', {}))} |")
        lines.append("")
    lines += ["## Schemas", ""]
    for name, s in sorted(schema.get("components", {}).get("schemas", {}).items()):
        lines += [f"### {name} {{#{name.lower()}}}", ""]
        if s.get("description"):
            lines += [_cell(s["description"]), ""]
        props = s.get("properties")
        if props:
            req = set(s.get("required", []))
            lines += ["| field | type | required | default | description |", "|---|---|---|---|---|"]
            for field, fs in props.items():
                default = f"`{json.dumps(fs['default'])}`" if "default" in fs else ""
                lines.append(f"| `{field}` | {_type(fs)} | {'yes' if field in req else 'no'} | {default} | "
                             f"{_cell(fs.get('description', ''))} |")
            lines.append("")
        else:
            lines += [f"Type: {_type(s)}.", ""]
        if "example" in s:
            lines += ["Example:", "", "```json", json.dumps(s["example"], indent=2), "```", ""]
    return "\n".join(lines)


_cache: dict[str, Any] = {}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its {MARKER} marker")
    _cache.setdefault("schema", _schema())
    return markdown.replace(MARKER, render(_cache["schema"]))


def on_files(files: Any, config: Any) -> Any:
    """Publish the schema beside the page, as a file of the site (so links to it are checked too)."""
    from mkdocs.structure.files import File

    _cache.setdefault("schema", _schema())
    files.append(File.generated(config, "reference/openapi.json", content=json.dumps(_cache["schema"], indent=2)))
    return files
