"""Rules of the codebase that a reviewer would otherwise have to remember: libraries are imported, entry
scripts are run; a switch is spelled `--name 0|1` everywhere (MiniMind's form, `--name` alone meaning 1)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*REPO.glob("*.py"), *REPO.glob("model/*.py"), *REPO.glob("dataset/*.py"),
                  *REPO.glob("trainer/*.py"), *REPO.glob("scripts/*.py")])


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def is_entry_script(tree: ast.Module) -> bool:
    """A file with an `if __name__ == "__main__":` block is run, not imported."""
    return any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
               and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
               for node in tree.body)


def imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


TREES = {module_name(path): ast.parse(path.read_text(encoding="utf-8")) for path in SOURCES}
ENTRY_SCRIPTS = {name for name, tree in TREES.items() if is_entry_script(tree)}


def test_the_entry_scripts_are_found():
    assert {"trainer.train_pretrain", "trainer.train_tokenizer", "scripts.demo_pipeline", "eval_llm"} <= ENTRY_SCRIPTS
    assert not {"trainer.engine", "trainer.rl", "scripts.common", "scripts.gguf_export", "model.loader"} & ENTRY_SCRIPTS


def test_no_module_imports_an_entry_script():
    offenders = {name: sorted(imported_modules(tree) & ENTRY_SCRIPTS) for name, tree in TREES.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_every_switch_is_spelled_0_or_1():
    """`action="store_true"` makes `--quick 1` an error where MiniMind's scripts take it; `model.cli.add_switch`
    takes both `--quick` and `--quick 0|1`."""
    store_true = [f"{name}:{node.lineno}" for name, tree in TREES.items() for node in ast.walk(tree)
                  if isinstance(node, ast.keyword) and node.arg == "action"
                  and isinstance(node.value, ast.Constant) and node.value.value in ("store_true", "store_false")]
    assert store_true == []
