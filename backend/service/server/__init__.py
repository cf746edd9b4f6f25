"""`farslip serve`: the local HTTP API (/v1) the QGIS plugin talks to.

Handlers are a few lines: they check the request with the engine's own checks (so a bad input
gets the same sentence as on the command line), then hand the job to the JobManager, whose single
worker thread owns the model. Every /v1 request needs `Authorization: Bearer <token>`; the token
is made fresh at each start unless given, and written with the URL to a connection file only the
user can read.

    app.py        the FastAPI app: error bodies, OPTIONS/Allow, the job store and worker it owns
    routes/       one module per area of /v1: models, segment, train, search, jobs
    security.py   bearer token, Host check, body limit, request path rules
    lifecycle.py  the process: state folder and its lock, logging, socket, connection file, shutdown
"""

from .app import create_app
from .lifecycle import serve, serve_command

__all__ = ["create_app", "serve", "serve_command"]
