"""Settings: profiles pick a column of defaults; a variable of its own still wins; bad values fail loudly."""

from __future__ import annotations

import dataclasses

import pytest

from settings import PROFILES, UPSTREAM_QUOTA_PER_MINUTE, Settings


def test_development_is_the_fields_own_defaults():
    assert PROFILES["development"] == {}
    settings = Settings.from_env({})
    assert settings.profile == "development" and settings.log_format == "text"
    assert settings.sources["viacep"].rate_per_minute == pytest.approx(600 * 0.95)


@pytest.mark.parametrize("profile", ["production", "high-load"])
def test_a_profile_sets_its_defaults_and_every_one_is_a_real_setting(profile):
    names = {item.name for item in dataclasses.fields(Settings)}
    assert set(PROFILES[profile]) <= names
    settings = Settings.from_env({"PROFILE": profile})
    for name, value in PROFILES[profile].items():
        assert getattr(settings, name) == value, name
    headroom = PROFILES[profile]["quota_headroom"]
    for source, quota in UPSTREAM_QUOTA_PER_MINUTE.items():
        limits = settings.sources[source]
        assert limits.rate_per_minute == pytest.approx(quota * headroom) and limits.rate_per_minute < quota
        assert limits.breaker_fail_max == PROFILES[profile]["breaker_fail_max"]
        assert limits.breaker_reset_timeout == PROFILES[profile]["breaker_reset_timeout"]


def test_a_variable_of_its_own_wins_over_the_profile():
    settings = Settings.from_env(
        {"PROFILE": "production", "WEB_WORKERS": "3", "LOG_FORMAT": "text", "RATE_LIMIT_VIACEP": "100"}
    )
    assert settings.web_workers == 3 and settings.log_format == "text"
    assert settings.worker_concurrency == PROFILES["production"]["worker_concurrency"]
    assert settings.sources["viacep"].rate_per_minute == 100
    assert Settings.from_env({"PROFILE": "production"}, web_workers=5).web_workers == 5


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PROFILE": "staging"}, "PROFILE must be one of development, production, high-load"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT must be 'text' or 'json'"),
        ({"WEB_WORKERS": "many"}, "WEB_WORKERS='many' is not a valid int"),
        ({"SOURCES_MODE": "mock"}, "SOURCES_MODE must be 'sandbox' or 'live'"),
    ],
)
def test_a_bad_value_names_the_setting(environ, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(environ)


def test_flags_default_on_and_follow_their_variables():
    settings = Settings.from_env({"CACHE_ENABLED": "false", "PROFILE": "high-load"})
    assert settings.cache_enabled is False
    assert settings.rate_limiting_enabled is True and settings.circuit_breaker_enabled is True
