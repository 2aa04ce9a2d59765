"""The chat page at GET /: plain HTML, CSS and JavaScript from templates/ and static/, no build step.

The page is a client of the same JSON API as any other. Its Content-Security-
Policy allows scripts, styles and requests from this origin only, so no
inline script runs even if text slipped into the markup.
"""
from __future__ import annotations

from flask import Flask, Response, render_template

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def chat_page(version: str) -> Response:
    response = Response(render_template("index.html", version=version), mimetype="text/html")
    secure(response)
    return response


def secure(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def init_app(app: Flask) -> None:
    """The page's own files carry the same policy."""
    static_view = app.view_functions["static"]

    def static(filename: str) -> Response:
        return secure(static_view(filename=filename))

    app.view_functions["static"] = static
