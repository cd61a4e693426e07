"""Settings: profiles pick a column of defaults; a variable of its own still wins; bad values fail loudly."""

from __future__ import annotations

import dataclasses

import pytest

from enrich.settings import (
    PROFILES,
    UPSTREAM_QUOTA_PER_MINUTE,
    Settings,
    normalise_origin,
    parse_allowed_origins,
)


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


def test_allowed_origins_are_parsed_into_normalised_origins():
    assert Settings.from_env({}).allowed_origins == ""
    assert parse_allowed_origins("") == frozenset()
    text = " https://App.Example.com:443/ ,http://localhost:3000,HTTP://[::1]:80,"
    assert parse_allowed_origins(text) == {"https://app.example.com", "http://localhost:3000", "http://[::1]"}
    assert Settings.from_env({"ALLOWED_ORIGINS": text}).allowed_origins == text
    assert (
        normalise_origin("https://app.example.com:8443/batches?id=1", whole_url=True)
        == "https://app.example.com:8443"
    )


@pytest.mark.parametrize(
    "entry",
    [
        "app.example.com",  # no scheme
        "*",
        "null",
        "https://app.example.com/batches",  # a path: not an origin
        "ftp://app.example.com",
        "https://user@app.example.com",
        "https://app.example.com:99999",
        "https://app example.com",
        "https://",
    ],
)
def test_a_malformed_allowed_origin_fails_loading_and_names_the_setting(entry):
    with pytest.raises(ValueError, match="ALLOWED_ORIGINS") as error:
        Settings.from_env({"ALLOWED_ORIGINS": f"https://ok.example.com,{entry}"})
    assert repr(entry) in str(error.value) or entry in str(error.value)


def test_admin_auth_limit_defaults_to_10_a_minute_and_a_malformed_one_fails_loading():
    assert Settings.from_env({}).admin_auth_limit == "10/minute"
    assert Settings.from_env({"ADMIN_AUTH_LIMIT": "off"}).admin_auth_limit == "off"
    assert Settings.from_env({"ADMIN_AUTH_LIMIT": "5/second;20/hour"}).admin_auth_limit == "5/second;20/hour"
    with pytest.raises(ValueError, match="ADMIN_AUTH_LIMIT='ten a minute' is not a rate limit"):
        Settings.from_env({"ADMIN_AUTH_LIMIT": "ten a minute"})


def test_allowed_hosts_default_to_this_machine_and_a_malformed_one_fails_loading():
    from enrich.settings import parse_allowed_hosts

    assert parse_allowed_hosts(Settings.from_env({}).allowed_hosts) == ["localhost", "127.0.0.1"]
    assert parse_allowed_hosts(" Enrich.Example.com , .example.org ") == [
        "enrich.example.com",
        ".example.org",
    ]
    assert parse_allowed_hosts("*") == parse_allowed_hosts("") == []
    for bad in ("https://enrich.example.com", "enrich.example.com:443", "::1", "a/b", "ex ample.com"):
        with pytest.raises(ValueError, match="ALLOWED_HOSTS"):
            Settings.from_env({"ALLOWED_HOSTS": bad})
