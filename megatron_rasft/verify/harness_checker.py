"""The checking side of a code check on the driver path (a second, fresh interpreter in the
sandbox; `plain.py` is prepended). The candidate's code never runs here.

Reads check.json: the problem's own test code (HumanEval `check(candidate)` with its code prefix,
or MBPP setup + asserts) and the numbers of three inherited pipes: requests to the candidate
(`req_fd`), its replies (`rep_fd`) and the verdict channel (`verdict_fd`). The candidate's
functions are stand-ins that send their arguments as plain data and return the decoded plain
reply: genuine built-in values, so the test's own comparisons run on objects the candidate never
touched. Writes one JSON verdict: {"reason": passed | failed_test | output_limit | no_candidate,
"detail"}.
"""
try:  # in the sandbox these names come from plain.py, prepended to this file
    from megatron_rasft.verify.plain import from_plain, to_plain
except ImportError:
    pass

MAX_REPLY_BYTES = 8 << 20


class _OutputLimit(Exception):
    pass


class _CandidateGone(Exception):
    pass


def main():
    import builtins
    import json
    import os
    import traceback

    with open("check.json") as f:
        spec = json.load(f)
    req = os.fdopen(spec["req_fd"], "w", buffering=1)
    rep = os.fdopen(spec["rep_fd"], "r")
    verdict = os.fdopen(spec["verdict_fd"], "w")
    counter = [0]

    def read_reply():
        line = rep.readline(MAX_REPLY_BYTES + 1)
        if len(line) > MAX_REPLY_BYTES:
            raise _OutputLimit()
        if not line:
            raise _CandidateGone()
        return json.loads(line)

    class Remote:
        """A function of the candidate, called across the boundary."""

        def __init__(self, name):
            self.name = name

        def __call__(self, *args, **kwargs):
            if kwargs:
                raise TypeError("keyword arguments do not cross the sandbox boundary")
            i = counter[0]
            counter[0] += 1
            try:
                req.write(json.dumps({"i": i, "fn": self.name, "args": to_plain(list(args))}) + "\n")
            except BrokenPipeError:
                raise _CandidateGone() from None
            r = read_reply()
            if type(r) is not dict or r.get("i") != i:
                raise AssertionError(f"call #{i} of {self.name}: malformed reply")
            if "exc" in r:
                exc = getattr(builtins, str(r["exc"]), None)
                if not (isinstance(exc, type) and issubclass(exc, Exception)):
                    exc = RuntimeError
                raise exc(f"{self.name} raised {str(r['exc'])[:40]}: {str(r.get('msg'))[:200]}")
            return from_plain(r["ok"])

    def finish(reason, detail=""):
        verdict.write(json.dumps({"reason": reason, "detail": detail[-2000:]}))
        verdict.close()
        os._exit(0)

    try:
        ready = read_reply()
        names = ready["ready"]
        if type(names) is not list:
            raise AssertionError("malformed ready line")
    except (_CandidateGone, ValueError, KeyError, TypeError, AssertionError):
        finish("no_candidate")
    except _OutputLimit:
        finish("output_limit")
    ns = {"__name__": "checker"}
    try:
        if spec["format"] == "humaneval":
            if spec.get("prefix"):
                try:  # the problem's own helpers (HumanEval/38's encode_cyclic) stay trusted copies
                    exec(spec["prefix"], ns)
                except Exception:  # noqa: BLE001 - a stub that is not a whole program
                    pass
            ns[spec["entry_point"]] = Remote(spec["entry_point"])  # tests may call it by name
            exec(spec["test"], ns)
            ns["check"](ns[spec["entry_point"]])
        else:
            exec(spec.get("setup") or "", ns)
            for name in names:
                if isinstance(name, str) and name not in ns and not hasattr(builtins, name):
                    ns[name] = Remote(name)
            for a in spec["asserts"]:
                exec(a, ns)
    except _OutputLimit:
        finish("output_limit")
    except _CandidateGone:
        finish("no_candidate", "the candidate's process ended during the tests")
    except BaseException:  # noqa: BLE001 - any failure of the test code is a failed test
        finish("failed_test", traceback.format_exc())
    finish("passed")


if __name__ == "__main__":
    main()
