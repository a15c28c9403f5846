"""Code verifier: the candidate runs contained; the verdict is computed where it cannot reach.

A check (`run_tests`) follows the problem's `Plan` (plan.py):
- pairs path: one sandboxed interpreter runs the program (code prefix + completion) under
  `harness_candidate.py` and answers call requests with plain data (plain.py); the trusted parent
  compares each output with the expected value (`plain.same`, strict types; the benchmark's
  `atol` for floats). Expected values never enter the sandbox.
- driver path (tests that are not literal (call, expected) pairs): a second sandboxed interpreter,
  which the candidate's code never touches, runs the problem's test code (`harness_checker.py`)
  and calls the candidate's functions through pipes; what comes back is decoded as plain data.
  The tests live only in that interpreter's own directory.

Containment of every sandboxed interpreter (what this machine allows is probed once,
`isolation()`; `SandboxConfig.require_isolation` refuses to run without it):
- its own fresh directory, removed afterwards;
- as root: a private mount + network namespace; the root directory replaced by a fresh tmpfs that
  holds only read-only binds of /usr (and the interpreter's prefix), the work dir at /work, a
  private /tmp and /dev/{null,zero,random,urandom} -- no /proc, /sys, /etc, /home, /root, no other
  files of the machine (the benchmark data, the run directory); no network (a down loopback);
  then a random unprivileged uid, so RLIMIT_NPROC really bounds fork bombs, other processes
  cannot be signalled or traced, and every process of that uid is killed afterwards (even ones
  that left the process group);
- resource limits (CPU, address space, file size, processes, no core files) set in preexec_fn;
- a wall-clock deadline that kills the process groups; output read up to a byte cap;
- `python -I -B` with a minimal environment.

Verdict reasons: passed | failed_test | timeout | crash | syntax_error | memory | output_limit.

The package: `isolation.py` (limits, namespaces, uid switch), `process.py` (running and reading
contained interpreters; `isolation()`, what this machine allows), `checks.py` (the two paths,
`run_tests`, `run_many`).
"""
from megatron_rasft.verify.sandbox.checks import REASONS, build_program, extract_code, run_many, run_tests  # noqa: F401
from megatron_rasft.verify.sandbox.isolation import SandboxConfig, live_pids_of_uid  # noqa: F401
from megatron_rasft.verify.sandbox.process import isolation  # noqa: F401
