"""The extension loader stays a loader: it imports neither the page nor the API, and the built-in extensions
import only the modules EXTENSIONS.md documents as public."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The built-ins this checks; xyz-grid and sd-upscale are checked the same way once their public imports settle.
BUILTINS = ("textual-inversion", "hypernetworks", "lora", "xyz-grid", "sd-upscale")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, at any depth (relative imports inside an extension are its own)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def public_modules() -> set[str]:
    """The `modules.*` names EXTENSIONS.md's text mentions in backticks (its tables and examples)."""
    text = (REPO / "EXTENSIONS.md").read_text(encoding="utf-8")
    return set(re.findall(r"\b(modules\.[a-z_]+)\b", text))


def test_loader_imports_neither_the_page_nor_the_api():
    imports = imported_modules(REPO / "modules" / "extensions.py")
    layered = {name for name in imports if name.split(".")[0] in {"gradio", "fastapi"}
               or name.startswith(("modules.ui", "modules.api"))}
    assert layered == set()
    # and importing it pulls in no UI, server or torch either (the console commands need none of them)
    code = ("import sys, modules.extensions; "
            "print(sorted(m for m in ('gradio', 'fastapi', 'torch', 'modules.ui', 'modules.api') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_builtin_extensions_import_only_public_modules():
    public = public_modules()
    for name in BUILTINS:
        for path in sorted((REPO / "extensions" / name).rglob("*.py")):
            used = {m for m in imported_modules(path) if m.split(".")[0] == "modules"}
            assert used <= public, f"{path.relative_to(REPO)} imports undocumented {sorted(used - public)}"
