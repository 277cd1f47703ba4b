"""`nanoseek serve [--model DIR]`: the DeepSeek/OpenAI-compatible API and the chat page, on uvicorn.

    nanoseek serve                                        # the newest run's final model, 127.0.0.1:8000
    nanoseek serve --model runs/demo/model --api-key sk-local --served-model-name deepseek-reasoner
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Authorization: Bearer sk-local' \\
         -d '{"model": "deepseek-reasoner", "messages": [{"role": "user", "content": "What is 12 + 30?"}]}'

Flags and wiring only: nanoseek/server/app.py is the server. Without --model it serves the newest
`runs/<name>/r1/` (the R1 recipe's final model), else the newest `runs/<name>/model/` (the demo
speedrun's), by the time their config.json was written; with neither it says how to make one.
The model is served under `--served-model-name` (repeat for aliases), by default the directory
path as given (vLLM's rule). Sampling defaults are the directory's generation_config.json (R1's
T = 0.6, top-p 0.95), used when a request sets none. It binds to 127.0.0.1 unless --host says
otherwise, and warns when it listens beyond loopback without an API key. Keys come from --api-key,
the NANOSEEK_API_KEY environment variable (which keeps the key out of `ps`) or --api-keys-file
(one a line, # comments). Ctrl-C (SIGINT/SIGTERM) stops taking requests at once (503), lets
running ones finish for --shutdown-grace-s, then ends the rest with an in-band 503 error event
(streams) or a 503 response, and exits.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import threading

from nanoseek.flags import add_dataclass_arguments, from_args

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(p) -> None:
    from nanoseek.server.app import ServerConfig
    p.add_argument("--model", default=None, help="checkpoint directory (default: the newest runs/*/r1 or "
                                                 "runs/*/model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require this key (Authorization: Bearer); default $NANOSEEK_API_KEY")
    p.add_argument("--api-keys-file", default=None, help="file of accepted keys, one a line (# comments)")
    p.add_argument("--served-model-name", action="append", default=None,
                   help="name clients use as `model` (repeat for aliases; default: the --model path)")
    add_dataclass_arguments(p, ServerConfig, skip=("served_model_names", "api_keys", "default_temperature",
                                                   "default_top_p"))
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="weights dtype (default: the "
                                                                                 "checkpoint's)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (the prefix cache's unit)")
    p.add_argument("--kv-cache-mb", type=int, default=256, help="KV cache memory in MiB")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together at most")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--speculative", type=int, default=0, help="MTP draft tokens per step (0 = off)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="decode steps of up to 32 sequences as torch.compile'd graphs (engine/graphs.py), compiled "
                        "at start-up (tiny model: ~2 min cold, seconds with inductor's cache warm); "
                        "--no-compile serves with the eager engine")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level")


def newest_model(root: str = "runs") -> str | None:
    """The newest runs/<name>/r1 (the recipe's final model), else the newest runs/<name>/model."""
    for pattern in ("*/r1/config.json", "*/model/config.json"):
        found = glob.glob(os.path.join(root, pattern))
        if found:
            return os.path.dirname(max(found, key=os.path.getmtime))
    return None


def read_keys(args) -> list[str]:
    keys = [args.api_key] if args.api_key else []
    if args.api_keys_file:
        with open(args.api_keys_file, encoding="utf-8") as f:
            keys += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    return keys


def exposure_warning(host: str, keys: list[str]) -> str | None:
    """The warning for a server reachable beyond this machine with no key, else None.

    >>> exposure_warning("127.0.0.1", []) is None, exposure_warning("0.0.0.0", ["k"]) is None
    (True, True)
    >>> exposure_warning("0.0.0.0", []).startswith("warning: listening on 0.0.0.0 without an API key")
    True
    """
    if host in LOOPBACK or keys:
        return None
    return (f"warning: listening on {host} without an API key: anyone who can reach this port can use the model "
            f"(set --api-key or NANOSEEK_API_KEY)")


def main(args) -> int:
    import uvicorn

    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.engine import LLM
    from nanoseek.engine.loading import sampling_defaults
    from nanoseek.server.app import ServerConfig, create_app
    model = args.model or newest_model()
    if model is None:
        print("nanoseek serve: no model to serve. Pass --model DIR, or make one first: `make speedrun` "
              "writes runs/<name>/...", file=sys.stderr)
        return 2
    model_dir = resolve_model_dir(model)
    keys = read_keys(args)
    warning = exposure_warning(args.host, keys)
    if warning:
        print(warning, file=sys.stderr)
    llm = LLM(model_dir, dtype=args.dtype, block_size=args.block_size, kv_cache_memory=args.kv_cache_mb << 20,
              max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, speculative_tokens=args.speculative,
              compile=args.compile, log=lambda m: print(m, file=sys.stderr))
    temperature, top_p = sampling_defaults(model_dir)
    cfg = from_args(ServerConfig, args, served_model_names=tuple(args.served_model_name or [model]),
                    api_keys=tuple(keys), default_temperature=temperature, default_top_p=top_p)
    app = create_app(llm, cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=int(cfg.shutdown_grace_s) + 5))
    exit_handler = server.handle_exit

    def handle_exit(sig, frame):
        # new requests get 503 from now on; running ones get shutdown_grace_s, then an in-band 503,
        # so their streams end cleanly before uvicorn's own graceful timeout would cut them
        app.state.engine.begin_shutdown()
        threading.Thread(target=app.state.engine.shutdown, args=(cfg.shutdown_grace_s,), daemon=True).start()
        exit_handler(sig, frame)

    server.handle_exit = handle_exit
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"nanoseek serve: {model_dir} as {cfg.served_model_names[0]!r} on http://{host}:{args.port} "
          f"(chat page at /, OpenAI base_url http://{host}:{args.port}/v1)", file=sys.stderr)
    try:
        server.run()
    except KeyboardInterrupt:                # uvicorn re-raises the signal after a clean shutdown
        pass
    return 0
