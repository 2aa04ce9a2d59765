"""The staff console page, `GET /staff`: plain HTML, CSS and JavaScript
(templates/staff.html, static/staff.js, static/staff.css) that call the same
JSON API as every other client, with the staff key the user pastes.

It is served with the chat page's headers (`pages.secure`): the same
Content-Security-Policy, which allows scripts, styles and requests from this
origin only, so no inline script runs.
"""
from __future__ import annotations

from flask import Blueprint, Flask, Response, render_template

from pages import secure

staff_pages = Blueprint("staff_console", __name__)


@staff_pages.get("/staff")
def staff_page() -> Response:
    response = secure(Response(render_template("staff.html"), mimetype="text/html"))
    response.headers["Cache-Control"] = "no-store"
    return response


def init_app(app: Flask) -> None:
    app.register_blueprint(staff_pages)
