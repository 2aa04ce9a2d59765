"""The staff console page, `GET /staff`: plain HTML, CSS and JavaScript
(templates/staff.html, static/staff.js, static/staff.css) that call the same
JSON API as every other client, with the staff key the user pastes.

The page's Content-Security-Policy allows scripts, styles and requests from
this origin only: no inline script, nothing from elsewhere.
"""
from __future__ import annotations

from flask import Blueprint, Flask, Response, render_template

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

pages = Blueprint("staff_console", __name__)


@pages.get("/staff")
def staff_page() -> Response:
    response = Response(render_template("staff.html"), mimetype="text/html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


def init_app(app: Flask) -> None:
    app.register_blueprint(pages)
