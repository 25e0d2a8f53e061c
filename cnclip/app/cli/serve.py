"""`cnclip serve`: the search page and JSON API (cnclip.app.serve) on a socket, kept current with --watch."""

from __future__ import annotations

import argparse
import os

from cnclip.app.cli.common import (
    Subparsers,
    add_index_option,
    add_no_t2s,
    add_runtime_options,
    add_watch_poll_option,
    positive_int,
    print_watch_batch,
    runtime,
    say,
)
from cnclip.errors import CNClipError


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, not {text}")
    return value


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="a web page and JSON API to search an index from a browser or a program")
    add_index_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--token",
        help="require this secret (Authorization: Bearer, or /?token= for the page); needed for a non-loopback "
        "--host (default: $CNCLIP_TOKEN)",
    )
    p.add_argument(
        "--watch",
        action="append",
        metavar="DIR",
        help="keep the index current with DIR while serving: new, changed, moved and deleted files are applied "
        "within seconds (repeatable)",
    )
    add_watch_poll_option(p)
    p.add_argument(
        "--upload-memory",
        type=positive_int,
        metavar="MB",
        help="memory that uploaded images may take decoded at once (default: room for two of 100 megapixels); "
        "an upload that finds it in use waits a few seconds, then gets 503",
    )
    add_no_t2s(p)
    add_runtime_options(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from cnclip.app.serve import TOKEN_ENV, check_bind, create_app, listen_socket
    except ImportError as e:
        raise CNClipError(
            f"cnclip serve needs FastAPI and uvicorn ({e.name} is missing); install them: pip install 'cnclip[serve]'"
        ) from e
    from cnclip.index.index import default_index_path

    if args.watch_poll and not args.watch:
        raise CNClipError("--watch-poll sets how --watch DIR looks for changes; add --watch DIR")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_bind(args.host, token)
    sock = listen_socket(args.host, args.port)  # a busy port fails before the model loads
    index = args.index or default_index_path()
    chosen = runtime(args)
    say(f"loading {index} ({chosen.describe()}) ...")
    options = {"watch": args.watch or (), "watch_poll": args.watch_poll, "on_watch": print_watch_batch}
    if args.upload_memory is not None:
        options["upload_memory"] = args.upload_memory * 2**20
    app = create_app(index, token=token, runtime=chosen, host=args.host, t2s=args.t2s, **options)
    if args.watch:
        say(f"watching {', '.join(args.watch)} for changes")
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}/" + ("?token=" + token if token else "")
    say(f"serving {index} at {url}  (Ctrl+C stops)", flush=True)
    config = uvicorn.Config(app, log_level="info" if args.verbose else "warning", access_log=args.verbose)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
