"""`podembed serve`: the HTTP API."""

from __future__ import annotations

import argparse
import sys

from config.errors import ConfigError
from config.settings import Settings


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from config.services import LOOPBACK
    from producer.web.api import create_app

    open_access = not settings.api_token
    if open_access and not args.insecure_loopback:
        raise ConfigError("PODEMBED_API_TOKEN is not set: set it, or pass --insecure-loopback to serve "
                          "without a token on a loopback address")
    if open_access and args.host not in LOOPBACK:
        raise ConfigError(f"--insecure-loopback serves on a loopback address only, not on {args.host}")
    app = create_app(settings, open_access=open_access)
    print(f"podembed API on http://{args.host}:{args.port} (OpenAPI: /docs, /openapi.json)"
          f"{', no token: loopback only' if open_access else ''}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="debug" if args.verbose else "info")
    return 0

