"""MASKFLEET_BROKER_ROUTES without a broker: the table's rules, its errors, and what producers and the launcher make of it.

The fleet itself on two Redis deployments is tests/test_fleet_routes.py.
"""
from __future__ import annotations

import json

import pytest

from maskfleet import cli
from maskfleet.client import app_for_model
from maskfleet.tasks import redis_keys
from maskfleet.tasks.broker_routes import common_route, group_urls, route_url, routed
from maskfleet.tasks.settings import DEFAULT_QUEUE, load_settings, model_queue
from maskfleet.worker import launcher

A, B, C = "redis://a:6379/0", "redis://:secret@b:6379/0", "sentinel://s1:26379;sentinel://s2:26379"
ROUTES = {"sdxl-*": B, "sdxl-base": C, "flux*": B}


def settings_with(routes: dict, **env: str):
    return load_settings({"MASKFLEET_BROKER_URL": A, "MASKFLEET_BROKER_ROUTES": json.dumps(routes), **env})


def test_an_exact_name_wins_then_the_first_pattern_then_the_default_group():
    s = settings_with(ROUTES)
    assert route_url(s, "sdxl-base") == C  # the exact name, although the pattern `sdxl-*` comes first
    assert route_url(s, "sdxl-turbo") == B and route_url(s, "flux1") == B
    assert route_url(s, "sd15") is None and route_url(s, "SDXL-turbo") is None  # case counts, as in model names
    assert group_urls(s) == [None, B, C]
    assert route_url(settings_with({"sd15": A}), "sd15") is None  # a route to the default broker is the default group


def test_a_routed_group_has_its_redis_as_broker_and_result_backend():
    s = settings_with(ROUTES, MASKFLEET_RESULT_BACKEND="redis://results:6379/2")
    assert routed(s, None) is s and s.result_backend == "redis://results:6379/2"
    b = routed(s, B)
    assert b.broker_url == b.result_backend == B and b.lease_seconds == s.lease_seconds


@pytest.mark.parametrize("raw, reason", [
    ('{"sdxl-*": "http://b:6379"}', "no Redis URL"),
    ('{"": "redis://b:6379"}', "empty"),
    ('["redis://b"]', "expected a JSON object"),
    ("{sdxl: redis://b}", "not JSON"),
])
def test_a_bad_table_names_the_variable_and_the_rule(raw, reason):
    with pytest.raises(ValueError, match="MASKFLEET_BROKER_ROUTES") as caught:
        load_settings({"MASKFLEET_BROKER_ROUTES": raw})
    assert reason in str(caught.value)


def test_one_worker_serves_one_group_and_says_which_models_do_not_share_it():
    s = settings_with(ROUTES)
    assert common_route(s, ["sdxl-a", "sdxl-b"]) == B and common_route(s, ["sd15"]) is None and common_route(s, []) is None
    with pytest.raises(ValueError) as caught:
        common_route(s, ["sd15", "sdxl-a", "flux1"])
    message = str(caught.value)
    assert "sd15 on MASKFLEET_BROKER_URL" in message and "sdxl-a, flux1 on redis://:***@b:6379/0" in message
    assert "secret" not in message


def test_the_launcher_gives_a_routed_group_its_redis_and_refuses_a_mixed_one(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MASKFLEET_BROKER_URL", A)
    monkeypatch.setenv("MASKFLEET_BROKER_ROUTES", json.dumps(ROUTES))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    [spec] = launcher.worker_specs("cpu", [model_queue("sdxl-a")], group_url=B)
    assert spec.env["MASKFLEET_BROKER_URL"] == spec.env["MASKFLEET_RESULT_BACKEND"] == B
    [plain] = launcher.worker_specs("cpu", [model_queue("sd15")])
    assert plain.env["MASKFLEET_BROKER_URL"] == A and "MASKFLEET_RESULT_BACKEND" not in plain.env
    for name in ("sd15", "sdxl-a", "flux1"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("MASKFLEET_MODELS", str(tmp_path))
    assert launcher.worker_queues(None) == [DEFAULT_QUEUE, model_queue("sd15")]  # the routed ones have their own workers
    with pytest.raises(SystemExit, match="different Redis deployments"):
        cli.main(["worker", "--device", "cpu", "--models-served", "sd15,sdxl-a"])


def test_a_producer_sends_each_model_to_its_group_and_keeps_a_client_per_redis(monkeypatch):
    monkeypatch.setenv("MASKFLEET_BROKER_URL", A)
    monkeypatch.setenv("MASKFLEET_BROKER_ROUTES", json.dumps(ROUTES))
    assert app_for_model("sdxl-a").conf.broker_url == app_for_model("sdxl-a").conf.result_backend == B
    assert app_for_model("sd15").conf.broker_url == A
    assert app_for_model("sdxl-a") is app_for_model("sdxl-b")  # one app per group, not per model
    first = redis_keys.connection(A)
    assert redis_keys.connection(B) is not first and redis_keys.connection(A) is first  # no churn between groups
