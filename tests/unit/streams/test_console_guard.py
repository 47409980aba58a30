"""The console's request checks (token, cross-site) and form parsing, with ctl's range errors."""

from __future__ import annotations

import pytest

from autoglm.streams.console.guard import COOKIE_NAME, CSRF_HEADER, new_token, parse_control_form, refusal

TOKEN = "t" * 43
OWN = {"scheme": "http", "host": "127.0.0.1:8321"}


def check(method="POST", headers=None, cookies=None):
    return refusal(method, headers or {}, cookies or {}, TOKEN, **OWN)


def test_browser_post_with_cookie_origin_and_header_passes():
    assert check(headers={"Origin": "http://127.0.0.1:8321", CSRF_HEADER: "1"}, cookies={COOKIE_NAME: TOKEN}) is None


def test_no_token_is_401():
    assert check(headers={"Origin": "http://127.0.0.1:8321", CSRF_HEADER: "1"})[0] == 401
    assert check(method="GET")[0] == 401


def test_wrong_token_is_401():
    assert check(headers={"Authorization": "Bearer nope"})[0] == 401
    assert check(cookies={COOKIE_NAME: "nope"}, headers={"Origin": "http://127.0.0.1:8321", CSRF_HEADER: "1"})[0] == 401


def test_another_origin_is_403_even_with_the_token():
    status, reason = check(headers={"Origin": "http://evil.example", "Authorization": f"Bearer {TOKEN}"})
    assert status == 403 and "evil.example" in reason
    assert check(headers={"Origin": "http://evil.example", CSRF_HEADER: "1"}, cookies={COOKIE_NAME: TOKEN})[0] == 403


def test_cookie_post_without_the_custom_header_or_origin_is_403():
    assert check(headers={"Origin": "http://127.0.0.1:8321"}, cookies={COOKIE_NAME: TOKEN})[0] == 403
    assert check(headers={CSRF_HEADER: "1"}, cookies={COOKIE_NAME: TOKEN})[0] == 403


def test_bearer_token_from_a_script_passes_without_origin():
    assert check(headers={"Authorization": f"Bearer {TOKEN}"}) is None


def test_cookie_get_passes():
    assert check(method="GET", cookies={COOKIE_NAME: TOKEN}) is None


def test_new_tokens_are_long_and_distinct():
    a, b = new_token(), new_token()
    assert a != b and len(a) >= 40


def test_form_parsing_types_the_values():
    command, target, params = parse_control_form({
        "command": "configure", "model": "digits", "worker": "",
        "params": {"latency_target_s": "0.05", "max_batch_size": "32", "max_wait_s": "", "mode": "fixed"}})
    assert (command, target) == ("configure", {"model": "digits"})
    assert params == {"latency_target_s": 0.05, "max_batch_size": 32, "mode": "fixed"}
    assert isinstance(params["max_batch_size"], int)


@pytest.mark.parametrize("params, message", [
    ({"max_batch_size": "0"}, "max_batch_size must be between 1 and 65536, got 0"),
    ({"max_batch_size": "1.5"}, "must be an integer"),
    ({"latency_target_s": "abc"}, "must be a number, got 'abc'"),
    ({"latency_target_s": "nan"}, "must be finite"),
    ({"max_wait_s": "61"}, "max_wait_s must be between 0 and 60, got 61.0"),
    ({"mode": "greedy"}, "mode must be one of"),
    ({"colour": "red"}, "unknown configure parameter 'colour'"),
    ({}, "configure needs at least one of"),
])
def test_bad_configure_values_get_ctl_range_errors(params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_control_form({"command": "configure", "params": params})


def test_same_message_as_ctl_configure():
    """The page shows exactly what `autoglm ctl configure --max-batch-size 0` prints."""
    from autoglm.processors.control import check_configure_params

    with pytest.raises(ValueError) as ctl:
        check_configure_params({"max_batch_size": 0})
    with pytest.raises(ValueError) as page:
        parse_control_form({"command": "configure", "params": {"max_batch_size": "0"}})
    assert str(page.value) == str(ctl.value)


@pytest.mark.parametrize("doc, message", [
    ({"command": "delete"}, "unknown command"),
    ({"command": "drain", "model": "digits"}, "drain applies to whole workers"),
    ({"command": "pause", "params": {"max_batch_size": 1}}, "pause takes no parameters"),
    ({"command": "load", "model": ""}, "load needs a model name"),
    ({"command": "unload"}, "unload needs a model name"),
    ([1, 2], "JSON object"),
])
def test_bad_requests(doc, message):
    with pytest.raises(ValueError, match=message):
        parse_control_form(doc)


def test_load_unload_and_reload_name_one_model():
    for command in ("load", "unload", "reload"):
        assert parse_control_form({"command": command, "model": "ranker", "worker": "w1"}) == (
            command, {"model": "ranker", "worker": "w1"}, {})


def test_a_pipeline_and_a_step_are_targets():
    assert parse_control_form({"command": "pause", "pipeline": "digits-routing", "model": "", "worker": ""}) == (
        "pause", {"pipeline": "digits-routing"}, {})
    assert parse_control_form({"command": "resume", "pipeline": "p", "step": "first", "worker": "w1"}) == (
        "resume", {"worker": "w1", "pipeline": "p", "step": "first"}, {})
    # a model within a pipeline: the steps of p running digits (targets combine with "and")
    assert parse_control_form({"command": "configure", "pipeline": "p", "model": "digits",
                               "params": {"max_batch_size": "8"}}) == (
        "configure", {"model": "digits", "pipeline": "p"}, {"max_batch_size": 8})


@pytest.mark.parametrize("doc, message", [
    ({"command": "pause", "step": "first"}, "a step is named within its pipeline"),
    ({"command": "pause", "model": "digits", "step": "first", "pipeline": ""}, "a step is named within its pipeline"),
    ({"command": "load", "model": "digits", "pipeline": "p"}, "load applies to a model served on its own topic"),
    ({"command": "unload", "model": "digits", "pipeline": "p"}, "unload applies to a model served on its own topic"),
    ({"command": "reload", "model": "digits", "pipeline": "p", "step": "s"}, "reload applies to a model served"),
    ({"command": "drain", "pipeline": "p"}, "drain applies to whole workers"),
    ({"command": "pause", "pipeline": ["p"]}, "pipeline must be a string"),
    ({"command": "pause", "pipeline": "p", "step": "s" * 257}, "step must be a string of at most 256"),
])
def test_bad_pipeline_targets(doc, message):
    with pytest.raises(ValueError, match=message):
        parse_control_form(doc)


@pytest.mark.parametrize("kwargs", [
    {"step": "first"},
    {"model": "digits", "pipeline": "p", "command": "load"},
])
async def test_the_same_target_rules_as_the_control_client(kwargs):
    """What the page refuses, ControlClient.send (``autoglm ctl``) refuses too, before any broker I/O."""
    from autoglm.streams.control import ControlClient

    kwargs = dict(kwargs)
    command = kwargs.pop("command", "pause")
    client = ControlClient("127.0.0.1:9", prefix="unit")  # never opened: the checks come first
    with pytest.raises(ValueError):
        await client.send(command, **kwargs)
    with pytest.raises(ValueError):
        parse_control_form({"command": command, **kwargs})
