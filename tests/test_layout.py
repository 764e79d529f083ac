"""The layering the README's architecture paragraph promises, checked on the source: handlers
never import bot/, storage imports neither, and no CLI command module imports the package
that assembles them (the import circle that bot/cli.py and bot/cli_ops.py once had)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize(("package", "forbidden"),
                         [("handlers", ("bot",)), ("storage", ("bot", "handlers"))])
def test_lower_layers_never_import_upper_ones(package: str, forbidden: tuple[str, ...]) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            name for name in _imports(path)
            if any(name == f or name.startswith(f + ".") for f in forbidden))
        for path in _modules(package)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_cli_command_modules_do_not_import_their_assembler() -> None:
    for path in _modules("bot/cli"):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        # Sibling command modules may share only bot.cli.base.
        bad = {n for n in _imports(path)
               if n in ("bot.cli", "bot.cli.main")
               or (n.startswith("bot.cli.") and n.split(".")[2] != "base")}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_bot_has_rooms_not_a_flat_heap() -> None:
    flat = sorted(p.name for p in (ROOT / "bot").glob("*.py"))
    assert flat == ["__init__.py", "app.py", "logs.py", "server.py", "settings.py"], flat
