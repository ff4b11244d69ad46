"""The HTTP routes, one module per surface: the original contract, OpenAI's API, jobs, live uploads, operations.

They import the domain (engines, jobs, diarization) and the checked fields below both; nothing imports them but
app.py.
"""

from __future__ import annotations

from flask import Flask

from ..state import ServiceState
from . import contract, openai, ops


def register(app: Flask, state: ServiceState, live=None) -> None:
    """Every surface's routes on app; the jobs' and the live uploads' only with a state directory (live)."""
    app.register_blueprint(ops.blueprint(state))
    app.register_blueprint(contract.blueprint(state))
    app.register_blueprint(openai.blueprint(state))
    if state.jobs is not None:
        from . import jobs
        from . import live as live_routes

        app.register_blueprint(jobs.blueprint(state, state.jobs))
        app.register_blueprint(live_routes.blueprint(state, live))
