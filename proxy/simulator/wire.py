"""JSON on the wire: answers in the upstream's error shape, and JSON object bodies in."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web


def error_response(
    status: int,
    message: str,
    *,
    error: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """``{"statusCode": N, "message": "...", "error"?: "..."}``, as HighLevel answers."""
    body: dict[str, object] = {"statusCode": status, "message": message}
    if error is not None:
        body["error"] = error
    return web.json_response(body, status=status, headers=headers)


def bad_request(message: str) -> web.Response:
    return error_response(400, message, error="bad_request")


async def read_json_object(request: web.Request) -> dict[str, object]:
    """The body as a JSON object (``{}`` when empty); ``ValueError`` when it is not one."""
    if not request.body_exists:
        return {}
    try:
        data = await request.json()
    except ValueError as exc:
        raise ValueError(f"body: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError("body: must be a JSON object")
    return data
