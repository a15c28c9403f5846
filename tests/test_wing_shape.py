"""The rounds wing stays small: no module over 250 lines, none importing more than 8 of the
package's modules (imports inside functions counted), measured over the source's syntax tree."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "megatron_rasft"
WING = sorted(PKG.glob("rounds/*.py")) + [PKG / "methods" / "sequences.py", PKG / "train" / "stream.py",
                                           PKG / "train" / "state.py"]


def package_imports(path: Path) -> set:
    """The package modules `path` imports anywhere in it (`from megatron_rasft.a import b` counts
    `megatron_rasft.a.b` when that is a module, else `megatron_rasft.a`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("megatron_rasft.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_rasft"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (PKG.parent / (sub.replace(".", "/") + ".py")).is_file()
                out.add(sub if is_module else node.module)
    return out - {"megatron_rasft"}


def test_rounds_wing_modules_are_small_with_a_narrow_fan_out():
    assert len(WING) >= 8, WING
    for path in WING:
        lines = len(path.read_text().splitlines())
        fan_out = package_imports(path)
        assert lines <= 250, (path, lines)
        assert len(fan_out) <= 8, (path, sorted(fan_out))


def test_fan_out_counts_imports_inside_functions():
    got = package_imports(PKG / "rounds" / "stages.py")
    assert "megatron_rasft.rollout.session" in got and "megatron_rasft.verify.stage" in got  # in functions
