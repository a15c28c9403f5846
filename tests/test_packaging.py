"""What ships: the wheel `pip wheel . --no-deps` builds holds the library only (no test helpers, no
development tools, no demo data, nothing of tests/), and the shipped code imports none of what is
left out; benchmarks import no test module."""
import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Files the library reads at run time or runs as programs: they must be in the wheel.
NEEDED = ("megatron_rasft/__init__.py", "megatron_rasft/verify/plain.py", "megatron_rasft/verify/harness_candidate.py",
          "megatron_rasft/verify/harness_checker.py", "megatron_rasft/verify/sandbox/checks.py",
          "megatron_rasft/demo/real_model/run.py", "megatron_rasft/rollout/vllm_ext.py")
LEFT_OUT = ("tests", "devtools", "helpers", "benchmarks", "tools", "examples")


def _imports(path: Path) -> set:
    """Top-level module names `path` imports (absolute imports only)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_wheel_holds_the_library_only(tmp_path):
    # Built from a copy: a build writes build/ and *.egg-info next to setup.py.
    src = tmp_path / "src"
    anywhere = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".bench")
    # What local runs leave at the top (the real-model run's models/, data/, hf/, eval/; runs/;
    # downloaded GPU wheels and results): large, untracked, never packaged.
    top_level = {"runs", "models", "data", "hf", "eval"}

    def ignore(folder, names):
        skip = set(anywhere(folder, names))
        if Path(folder) == ROOT:
            skip |= top_level & set(names)
        if Path(folder) == ROOT / "benchmarks":
            skip |= {"wheels", "results"} & set(names)
        return skip

    shutil.copytree(ROOT, src, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("megatron_rasft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    missing = [n for n in NEEDED if n not in names]
    assert not missing, f"the wheel lacks files the library needs: {missing}"
    top = {n.split("/")[0] for n in names}
    assert top <= {"megatron_rasft", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top
    stray = [n for n in names if any(f"/{d}/" in f"/{n}" for d in LEFT_OUT + ("testing", "fixtures"))]
    assert not stray, f"test helpers, tools or tests in the wheel: {stray}"
    data = [n for n in names if not n.endswith(".py") and ".dist-info/" not in n]
    assert not data, f"data files in the wheel: {data}"
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    unconditional = [r for r in requires if "extra ==" not in r]
    assert not [r for r in unconditional if "tomli" in r], f"tomli-w is for the demo only: {unconditional}"


def test_shipped_code_imports_no_test_helpers():
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & {"tests", "devtools", "helpers", "conftest"})
           for p in (ROOT / "megatron_rasft").rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}
    assert not (ROOT / "megatron_rasft" / "testing").exists()


def test_benchmarks_import_no_test_module():
    bad = {p.name: sorted(_imports(p) & {"tests", "helpers", "conftest"}) for p in (ROOT / "benchmarks").glob("*.py")}
    assert not {k: v for k, v in bad.items() if v}
