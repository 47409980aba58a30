"""The console's request checks and form parsing: pure functions, no HTTP framework, no Kafka.

Who may change state (README "Ops console", security):

- **Authentication**: every request but the login form and static files carries the
  console token, either as ``Authorization: Bearer <token>`` (scripts) or as the
  ``autoglm_console`` cookie (browsers; ``HttpOnly``, ``SameSite=Strict``, set once
  by ``GET /login?token=...`` so the token never stays in the address bar or in a page).
- **Cross-site requests** (CSRF, OWASP "Cross-Site Request Forgery Prevention"): a
  state-changing request (``POST``) authenticated by the cookie must also carry the
  custom header ``X-AutoGLM-Console: 1`` (a cross-origin page cannot send a custom
  header without a CORS preflight, which the console never grants) and an ``Origin``
  equal to the console's own; any request whose ``Origin`` names another site is refused,
  whatever its credentials.
- Tokens are compared in constant time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac
import math
import secrets
from typing import Any, Mapping

from autoglm.processors.control import CONFIGURE_PARAMS, TARGET_KEYS, check_configure_params

COOKIE_NAME = "autoglm_console"
CSRF_HEADER = "X-AutoGLM-Console"
#: Commands the page may publish (``status`` is the CLI's; load/unload come with the model repository).
PAGE_COMMANDS = ("pause", "resume", "drain", "configure", "load", "unload", "reload")
#: commands that act on one model of the repository (README "Serve your own model")
MODEL_PAGE_COMMANDS = ("load", "unload", "reload")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def new_token() -> str:
    """A random console token: 32 bytes from :mod:`secrets`, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison; False for a missing value."""
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def refusal(method: str, headers: Mapping[str, str], cookies: Mapping[str, str], token: str, *,
            scheme: str, host: str) -> tuple[int, str] | None:
    """Why a request must be refused, as ``(http status, reason)``, or None to let it through.

    Args:
        method: HTTP method.
        headers: request headers (case-insensitive mapping, as aiohttp's ``CIMultiDict``).
        cookies: request cookies.
        token: the console token.
        scheme, host: the console's own scheme and ``Host`` header value, which make its origin.

    Returns:
        ``(401, ...)`` no valid token; ``(403, ...)`` a cross-site request.
    """
    origin = headers.get("Origin")
    own = f"{scheme}://{host}"
    if origin is not None and origin != own:
        return 403, f"cross-origin request refused (Origin {origin!r} is not {own!r})"
    auth = headers.get("Authorization", "")
    bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
    if bearer is not None:
        return None if token_matches(bearer, token) else (401, "invalid token")
    if not token_matches(cookies.get(COOKIE_NAME), token):
        return 401, "a console token is required (open the URL printed at start, or send Authorization: Bearer)"
    if method.upper() not in SAFE_METHODS:
        if origin is None:
            return 403, "a state-changing request from a browser must carry an Origin header"
        if headers.get(CSRF_HEADER) != "1":
            return 403, f"a state-changing request must carry the header {CSRF_HEADER}: 1"
    return None


def _number(name: str, raw: Any, kind: type) -> int | float:
    if isinstance(raw, bool):
        raise ValueError(f"configure parameter {name!r} must be {kind.__name__}, got {raw!r}")
    if isinstance(raw, (int, float)):
        value: int | float = raw
    else:
        text = str(raw).strip()
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise ValueError(f"configure parameter {name!r} must be {'an integer' if kind is int else 'a number'}, "
                             f"got {text!r}") from None
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"configure parameter {name!r} must be an integer, got {value!r}")
        value = int(value)
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"configure parameter {name!r} must be finite, got {raw!r}")
    return value


def parse_control_form(doc: Any) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Turn the page's control request into ``(command, target, params)``, with ``ctl``'s checks.

    Args:
        doc: the JSON body ``{"command": str, "model": str?, "worker": str?, "pipeline": str?, "step": str?,
            "params": {name: str|number}?}``; empty strings mean "not set" (form fields left blank).

    Returns:
        The command, the target (``model``/``worker``/``pipeline``/``step`` when set, the keys of
        :data:`~autoglm.processors.control.TARGET_KEYS`; they combine with "and") and the typed
        ``configure`` parameters.

    Raises:
        ValueError: not an object, an unknown command, a target value that is not a string of at most
            256 characters, a ``step`` without its ``pipeline`` or a ``pipeline`` on ``load``/``unload``/
            ``reload`` (the checks of :meth:`~autoglm.streams.control.ControlClient.send`, as ``autoglm ctl``),
            a model or pipeline on ``drain``, or a ``configure`` parameter that is unknown, mistyped or out
            of range (the messages of :func:`~autoglm.processors.control.check_configure_params` and the
            batching policy's ``configure``, the same as ``autoglm ctl configure``).
    """
    if not isinstance(doc, dict):
        raise ValueError("the request body must be a JSON object")
    command = doc.get("command")
    if command not in PAGE_COMMANDS:
        raise ValueError(f"unknown command {command!r}; expected one of {PAGE_COMMANDS}")
    target: dict[str, str] = {}
    for name in TARGET_KEYS:
        value = doc.get(name)
        if value in (None, ""):
            continue
        if not isinstance(value, str) or len(value) > 256:
            raise ValueError(f"{name} must be a string of at most 256 characters")
        target[name] = value
    if "step" in target and "pipeline" not in target:
        raise ValueError("a step is named within its pipeline: give the pipeline too")
    if command == "drain" and ({"model", "pipeline"} & set(target)):
        raise ValueError("drain applies to whole workers, not to one model or pipeline")
    if command in MODEL_PAGE_COMMANDS and "model" not in target:
        raise ValueError(f"{command} needs a model name")
    if command in MODEL_PAGE_COMMANDS and "pipeline" in target:
        raise ValueError(f"{command} applies to a model served on its own topic, not to a pipeline")
    raw_params = doc.get("params") or {}
    if not isinstance(raw_params, dict):
        raise ValueError("params must be an object")
    params: dict[str, Any] = {}
    if command == "configure":
        for name, raw in raw_params.items():
            if raw in (None, ""):
                continue
            types = CONFIGURE_PARAMS.get(name)
            if types is None:
                raise ValueError(f"unknown configure parameter {name!r}; known: {sorted(CONFIGURE_PARAMS)}")
            params[name] = str(raw).strip() if types == (str,) else _number(name, raw, types[-1])
        check_configure_params(params)
        from autoglm.processors.adaptive import AdaptiveBatchPolicy

        AdaptiveBatchPolicy().configure(**params)  # the policy's own cross-checks, as ControlClient.send
    elif raw_params:
        raise ValueError(f"{command} takes no parameters")
    return command, target, params
