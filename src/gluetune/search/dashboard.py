"""Watching a search live with optuna-dashboard, Optuna's own web UI (PyPI: optuna-dashboard).

`optuna-dashboard <search_dir>/study.journal` (or the database URL of --storage) serves it from
another terminal, on any machine that reads the study; `gluetune search --dashboard` serves the
same app from the search command itself (a thread: optuna_dashboard.wsgi over the study's storage),
on 127.0.0.1 and a free port unless one is given, for as long as the command runs.
"""

from __future__ import annotations

import shlex
import threading

from ..errors import UserError

INSTALL_DASHBOARD = "pip install 'gluetune[search]' (or pip install optuna-dashboard)"
HOST = "127.0.0.1"


def command_line(target: str) -> str:
    """The command that serves the dashboard of a study: `target` a journal file or a database URL
    (as it may be printed: the password masked)."""
    return f"optuna-dashboard {shlex.quote(target)}"


class Dashboard:
    def __init__(self, server, thread: threading.Thread):
        self.server, self.thread = server, thread

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/dashboard"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def serve(storage, port: int = 0, host: str = HOST) -> Dashboard:
    """optuna-dashboard over `storage` (an Optuna storage) in a thread of this process; port 0: a free one."""
    try:
        import optuna_dashboard
    except ImportError:
        raise UserError(f"--dashboard needs optuna-dashboard, which is not installed: {INSTALL_DASHBOARD}") from None
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):  # one line per request would drown the search's own lines
            pass

    try:
        server = make_server(host, port, optuna_dashboard.wsgi(storage), server_class=Server, handler_class=Quiet)
    except OSError as err:
        raise UserError(f"--dashboard {port}: cannot listen on {host}:{port} ({err}); give another port, or none for a "
                        "free one") from None
    thread = threading.Thread(target=server.serve_forever, name="optuna-dashboard", daemon=True)
    thread.start()
    return Dashboard(server, thread)
