"""Passwords in storage URLs never reach stdout, stderr, plans, reports or logs: every form
SQLAlchemy and libpq accept, tried against a live PostgreSQL server (CI starts one)."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import pytest

from precsearch.cli import main

LIVE = os.environ.get("PRECSEARCH_TEST_POSTGRES", "")
pytestmark = pytest.mark.skipif(not LIVE, reason="set PRECSEARCH_TEST_POSTGRES=postgresql://... (CI starts a server)")
DEMO = ["--model", "precsearch.examples.demo:small_model", "--data", "precsearch.examples.demo:data"]


def _parts():
    url = urlsplit(LIVE)
    return url.username, url.password, f"{url.hostname}:{url.port}", url.path


def _leaks(secret: str, text: str, out) -> list[str]:
    found = ["output"] if secret in text else []
    for path in out.rglob("*") if out.exists() else []:
        if path.is_file() and secret.encode() in path.read_bytes():
            found.append(str(path))
    return found


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_a_search_on_postgres_never_shows_the_password(form, tmp_path, capsys):
    user, password, host, db = _parts()
    url = {"userinfo": LIVE,
           "query": f"postgresql://{user}@{host}{db}?sslmode=disable&password={password}"}[form]
    out = tmp_path / "out"
    study = f"secret-{form}-{os.getpid()}"
    assert main(["optimize", "--trials", "2", "--storage", url, "--study", study, "--out", str(out), *DEMO]) == 0
    assert main(["report", str(out), "--storage", url, "--study", study]) == 0
    captured = capsys.readouterr()
    assert not _leaks(password, captured.out + captured.err, out)
    assert (out / "plan.yaml").is_file() and "***" in (out / "plan.yaml").read_text()


@pytest.mark.parametrize("form", ["empty-user", "at-sign", "query-mixed-case", "space", "tab", "query-space",
                                  "options"])
def test_a_login_never_shows_the_password(form, tmp_path, capsys):
    user, _, host, db = _parts()
    secret = "Sekr1t-not-the-password"
    url = {"empty-user": f"postgresql://:{secret}@{host}{db}",
           "at-sign": f"postgresql://{user}:{secret[:5]}@{secret[5:]}@{host}{db}",
           "query-mixed-case": f"postgresql://{user}@{host}{db}?PassWord={secret}",
           "space": f"postgresql://{user}:{secret[:5]} {secret[5:]}@{host}{db}",
           "tab": f"postgresql://{user}:{secret[:5]}\t{secret[5:]}@{host}{db}",
           "query-space": f"postgresql://{user}@{host}{db}?password={secret[:5]} {secret[5:]}",
           "options": f"postgresql://{user}@{host}{db}?options=-c%20password%3D{secret}"}[form]
    # refused, or (the CI server trusts local logins) accepted whatever the password: masked either way
    study = f"login-{form}-{os.getpid()}"
    code = main(["optimize", "--trials", "2", "--storage", url, "--study", study, "--out", str(tmp_path / "out"), *DEMO])
    captured = capsys.readouterr()
    assert code in (0, 2) and "internal error" not in captured.err, captured.err
    for part in (secret, secret[:5], secret[5:]):
        assert not _leaks(part, captured.out + captured.err, tmp_path)
