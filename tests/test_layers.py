"""The package's layers: a module imports only from its own layer and the ones below, there is
no import cycle, and the coordinator's ServerApp starts without PyTorch or the partner's code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fedpersona

PACKAGE = Path(fedpersona.__file__).resolve().parent

# Lowest first; the application modules sit on top of everything.
LAYERS = ("errors", "config", "data", "privacy", "model", "personas", "federation", "deploy", "application")
APPLICATION = ("__init__", "__main__", "cli", "simulation", "sweep", "report", "partner_report", "audit", "budget")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return LAYERS.index("application") if top in APPLICATION else LAYERS.index(top)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Every fedpersona module ``path`` imports (optionally only at module level)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if top_level_only and isinstance(node, ast.If):  # ``if TYPE_CHECKING:`` blocks do not run
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedpersona"):
            out.add(node.module)
            out.update(
                f"{node.module}.{a.name}"
                for a in node.names
                if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).exists()
            )
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fedpersona"))
    return out


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_higher_layer() -> None:
    problems = []
    for name, path in _modules().items():
        for target in _imports(path, top_level_only=False):
            if _layer(target) > _layer(name):
                problems.append(f"{name} ({LAYERS[_layer(name)]}) imports {target} ({LAYERS[_layer(target)]})")
    assert not problems, "\n".join(sorted(problems))


def test_no_import_cycle_at_module_level() -> None:
    modules = _modules()
    graph = {
        name: {t for t in _imports(path, top_level_only=True) if t in modules and t != name}
        for name, path in modules.items()
    }
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_each_subpackage_says_what_it_is_and_pins_its_modules() -> None:
    for init in PACKAGE.glob("*/__init__.py"):
        module = ast.parse(init.read_text(encoding="utf-8"))
        doc = ast.get_docstring(module)
        assert doc and len(doc) > 80, f"{init}: a one-paragraph docstring"
        exported = next(
            n.value
            for n in module.body
            if isinstance(n, ast.Assign) and n.targets[0].id == "__all__"  # type: ignore[attr-defined]
        )
        names = set(ast.literal_eval(exported))
        files = {p.stem for p in init.parent.glob("*.py") if p.stem not in ("__init__", "__main__")}
        assert files <= names, f"{init}: __all__ {sorted(names)} misses modules {sorted(files - names)}"


def test_no_module_is_longer_than_about_six_hundred_lines() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 650}
    assert not long, long


def test_the_server_app_starts_without_torch_or_the_partner_code() -> None:
    code = (
        "import sys, fedpersona.federation.server_app; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'opacus') "
        "or m in ('fedpersona.federation.partner', 'fedpersona.federation.client_app', 'fedpersona.model.training', "
        "'fedpersona.model.encoder')); print(bad)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]", done.stdout[:500]


def test_the_command_line_starts_without_torch() -> None:
    code = (
        "import sys, fedpersona.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'opacus', 'flwr')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]", done.stdout[:500]


def test_version_names_the_installed_packages_without_importing_them() -> None:
    from importlib.metadata import version

    code = (
        "import sys\nfrom fedpersona.cli import main\nsys.argv = ['fedpersona', '--version']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'opacus', 'flwr')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    first, loaded = done.stdout.strip().splitlines()[0], done.stdout.strip().splitlines()[-1]
    assert first.startswith(f"fedpersona {version('fedpersona')} (flwr {version('flwr')}, opacus {version('opacus')}")
    assert f"torch {version('torch')}" in first and loaded == "[]"


def test_persona_inference_runs_without_torch(tmp_path: Path) -> None:
    """`fedpersona infer` assigns personas from the public persona view and the released
    mixture: its code path never imports PyTorch, Opacus or scikit-learn (seconds of start-up)."""
    code = (
        "import sys\n"
        "from fedpersona.federation.partner_personas import infer_users, persona_width\n"
        "from fedpersona.model.artifacts import verify_model\n"
        "from fedpersona.data.schema_reader import partner_schema\n"
        "from fedpersona.config.settings import PartnerConfig, PrivacySettings\n"
        f"cfg = PartnerConfig(name='shop', kind='ecommerce', state_dir={str(tmp_path)!r}, "
        "privacy=PrivacySettings(target_epsilon=3.0), synthetic_rows=100)\n"
        "assert persona_width(cfg) > 0 and partner_schema(cfg).kind == 'ecommerce'\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'opacus', 'sklearn')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]", done.stdout[:500]
