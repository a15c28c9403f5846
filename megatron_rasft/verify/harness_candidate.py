"""The candidate's side of a code check (runs inside the sandbox; `plain.py` is prepended).

Runs `solution.py` as a module (then `setup.py`, MBPP's setup code, when present), announces its callable names on the reply channel (fd argv[1]),
then answers call requests read from stdin, one JSON line each ({"i", "fn", "args"}), with
{"i", "ok": plain value} or {"i", "exc": exception type name}. It holds no tests and no expected
values: whatever it writes is only ever read as plain data by the other side.
Exit codes: 4 syntax error, 5 MemoryError, 6 exception while running the module.
"""
try:  # in the sandbox these names come from plain.py, prepended to this file
    from megatron_rasft.verify.plain import from_plain, to_plain
except ImportError:
    pass


def main():
    import json
    import os
    import sys
    import traceback

    reply = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    with open("solution.py") as f:
        src = f.read()
    try:
        code = compile(src, "solution.py", "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc()
        os._exit(4)
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(code, ns)
        if os.path.exists("setup.py"):  # MBPP's test_setup_code (imports the reference code relies on)
            with open("setup.py") as f:
                exec(f.read(), ns)
    except MemoryError:
        os._exit(5)
    except BaseException:  # noqa: BLE001 - SystemExit too: the module must define, not exit
        traceback.print_exc()
        os._exit(6)
    reply.write(json.dumps({"ready": sorted(k for k, v in list(ns.items()) if callable(v) and not k.startswith("__"))}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        try:
            value = ns[req["fn"]](*from_plain(req["args"]))
            out = json.dumps({"i": req["i"], "ok": to_plain(value)})
        except MemoryError:
            os._exit(5)
        except BaseException as e:  # noqa: BLE001 - reported to the checking side as data
            out = json.dumps({"i": req["i"], "exc": type(e).__name__, "msg": str(e)[:200]})
        reply.write(out + "\n")
    reply.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
