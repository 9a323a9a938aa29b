"""A web page for tracking points in a video: open a file or a bundled clip, click points, Track, download.

    python app.py                                   # then open the address it prints (it ends in ?token=...)
    python app.py --init_dir=./reference_model --port=8000
    python app.py --model=lbm --init_dir=lbm        # LBM preselected, the hub name lbm (the page can switch)

The server is waitress (pips2.webapp); it listens on 127.0.0.1 unless --host says otherwise, answers only to
the loopback names and the --host name, and only to a browser that opened the printed address (a per-run token).
The page may choose only the checkpoints named here (--init_dir, demo.py's ./reference_model for pips2) and the
hub names pips2 and lbm. At start it prints one line for each: ready, or how to get it; the page says the same
(Track is off for a missing one) and the server starts even when none is ready. Bounds on what one request may
cost: docs/WEBAPP.md.
"""

from __future__ import annotations

import ipaddress
import sys

from pips2.utils.checkpoint import CheckpointError
from pips2.utils.cli import run_fire
from pips2.webapp import MAX_DECODED_MB, App, serve


def main(port: int = 7860, host: str = "127.0.0.1", init_dir: str | None = None, model: str = "pips2",
         device: str = "cpu", S: int = 128, iters: int = 16, max_decoded_mb: int = MAX_DECODED_MB) -> None:
    """Serve the web demo; --init_dir and --model are the page's defaults (demo.py's: ./reference_model, pips2);
    --max_decoded_mb bounds what one video may decode to at the size it is tracked at (frames x H x W x 3)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        # waitress would fail on a negative port in a traceback and serve 70000 on 70000 % 65536 without a word
        print(f"error: --port must be a whole number in 0..65535 (0: any free port), got {port!r}", file=sys.stderr,
              flush=True)
        sys.exit(2)
    try:
        app = App(init_dir=init_dir, model=model, device=device, S=S, iters=iters, max_decoded_mb=max_decoded_mb)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    host = str(host)
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address as URLs write it: [::1]
        host = host[1:-1]
    if ":" in host and not _is_ip(host):  # localhost:7990, [::1]:8000: the port is its own flag
        app.close()
        print(f"error: --host={host} holds a port; give the name or address alone and the port with --port",
              file=sys.stderr, flush=True)
        sys.exit(2)
    serve(app, host, port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def cli() -> None:
    """The `pips2-app` command (and `python app.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
