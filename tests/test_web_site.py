"""The web site's root (smartrelay.web.site), its pages from template files, and the package
data that ships them."""

from __future__ import annotations

import configparser
import re
import shutil
from collections.abc import AsyncIterator
from fnmatch import fnmatch
from pathlib import Path

import markupsafe
import pytest
import pytest_twisted
import treq
from setuptools import find_namespace_packages  # type: ignore[import-untyped]
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool

from smartrelay.config import Config, SuppressionConfig
from smartrelay.listening import ListeningService
from smartrelay.storage.store import Store
from smartrelay.tokens import TokenCodec, load_keyring
from smartrelay.web import pages as pages_module
from smartrelay.web.pages import TEMPLATES, Pages, TemplateError
from smartrelay.web.service import web_service
from smartrelay.web.site import WebRoot
from smartrelay.web.tracking import PIXEL_GIF, Tracking
from tests.conftest import real_reactor
from tests.support.relay import RelayStartError, free_ports, relay_config, start_in_process

REPO = Path(__file__).parent.parent


# --------------------------------------------------------------------------------------
# The root over real HTTP


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path, store: Store, clock: Clock) -> AsyncIterator[str]:
    codec = TokenCodec(load_keyring(str(tmp_path / "secret.key")))
    tracking = Tracking(lambda: succeed(store), codec, clock, SuppressionConfig())
    fatal: list[str] = []
    service: ListeningService = web_service(
        real_reactor(), "tcp:0:interface=127.0.0.1", WebRoot(tracking).resource(), fatal.append
    )
    service.startService()
    assert fatal == [] and service.port is not None
    yield f"http://127.0.0.1:{service.port.getHost().port}"  # type: ignore[attr-defined]
    stopped = service.stopService()
    if stopped is not None:
        await stopped


async def get(url: str, method: str = "GET") -> tuple[int, dict[bytes, list[bytes]], bytes]:
    reactor = real_reactor()
    pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
    agent = Agent(reactor, pool=pool)  # type: ignore[no-untyped-call]
    response = await treq.request(method, url, agent=agent)
    body: bytes = await response.content()
    return response.code, dict(response.headers.getAllRawHeaders()), body


@pytest.mark.parametrize(
    "path", ["/", "/nope", "/ui/", "/api/v1/messages", "/metrics", "/o/", "/c/", "/u/", "/o"]
)
@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_a_plain_404_page(site: str, path: str) -> None:
    code, headers, body = await get(site + path)
    assert code == 404
    assert b"<h1>Not found</h1>" in body
    assert b"Traceback" not in body and b"twisted" not in body.lower()
    assert b"Server" not in headers
    assert headers[b"X-Content-Type-Options"] == [b"nosniff"]


@pytest_twisted.ensureDeferred
async def test_the_tracking_urls_answer_through_the_root(site: str) -> None:
    code, headers, body = await get(site + "/o/not-a-token.gif")
    assert (code, body) == (200, PIXEL_GIF)
    assert b"Server" not in headers
    code, headers, _body = await get(site + "/c/not-a-token")
    assert code == 404 and b"Location" not in headers
    code, _headers, body = await get(site + "/u/not-a-token", "POST")
    assert code == 404 and b"<h1>Not found</h1>" in body
    code, headers, _body = await get(site + "/o/not-a-token.gif", "DELETE")
    assert code == 405 and headers[b"Allow"] == [b"GET, HEAD"]


# --------------------------------------------------------------------------------------
# Pages from the template files


def test_pages_escape_what_they_are_given() -> None:
    pages = Pages.load()
    hostile = "<script>alert('x')</script>&\"@example.com"
    for page in (pages.unsubscribe_confirm(hostile), pages.unsubscribe_done(hostile)):
        text = page.decode("utf-8")
        assert str(markupsafe.escape(hostile)) in text
        assert "<script>" not in text
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&#34;@" in text


def test_the_confirm_page_posts_the_form() -> None:
    text = Pages.load().unsubscribe_confirm("j***@example.com").decode("utf-8")
    assert text.startswith("<!DOCTYPE html>\n") and text.endswith("</html>\n")
    assert "<title>Unsubscribe</title>" in text
    assert (
        "<main>\n<h1>Unsubscribe</h1>\n<p>Stop sending email to <strong>j***@example.com"
        '</strong>?</p>\n<form method="post">\n' in text
    )
    assert '<input type="hidden" name="confirm" value="yes">' in text
    assert "</form>\n</main>" in text


def copy_templates(tmp_path: Path) -> Path:
    folder = tmp_path / "templates"
    shutil.copytree(str(TEMPLATES), folder)
    return folder


def test_a_missing_template_is_one_line_at_load(tmp_path: Path) -> None:
    folder = copy_templates(tmp_path)
    (folder / "unsubscribe_done.html").unlink()
    with pytest.raises(TemplateError) as info:
        Pages.load(folder)
    assert "unsubscribe_done.html" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("unsubscribe_confirm.html", "<p>Stop sending email to {{ adress }}?</p>\n"),
        ("page.html", "<title>{{ title }}</title>\n"),
        ("not_found.html", "<p>costs {{ 5 </p>\n"),
    ],
)
def test_a_template_with_wrong_placeholders_is_refused_at_load(
    tmp_path: Path, name: str, text: str
) -> None:
    folder = copy_templates(tmp_path)
    (folder / name).write_text(text, encoding="utf-8")
    with pytest.raises(TemplateError) as info:
        Pages.load(folder)
    assert name in str(info.value)


@pytest_twisted.ensureDeferred
async def test_a_relay_whose_templates_are_broken_does_not_start(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The templates are read when the relay starts: a missing one is one fatal line then,
    not a 500 on the first unsubscribe."""
    folder = copy_templates(tmp_path)
    (folder / "page.html").unlink()
    monkeypatch.setattr(pages_module, "TEMPLATES", folder)
    data_dir = tmp_path / "data"

    def make_config(smtp_port: int, inbound_port: int) -> Config:
        return relay_config(data_dir, database_url, smtp_port, inbound_port, free_ports(1)[0])

    with pytest.raises(RelayStartError) as info:
        await start_in_process(real_reactor(), make_config)
    assert "page.html" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------
# What the package ships


def setup_list(value: str) -> list[str]:
    """A setup.cfg list as setuptools reads it: one item a line, or items split by commas."""
    return [item.strip() for item in re.split(r"[,\n]", value) if item.strip()]


def test_every_package_and_data_file_is_in_setup_cfg() -> None:
    """Each folder of smartrelay/ is a package setuptools finds (``find_namespace:`` with
    setup.cfg's include patterns), and every non-Python file in it (templates, SQL) matches the
    package_data of its package or of a package above it."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["options"]["packages"].strip() == "find_namespace:"
    include = setup_list(setup["options.packages.find"]["include"])
    packages = set(find_namespace_packages(where=str(REPO), include=include))
    assert "twisted.plugins" in packages and "twisted" not in packages
    data = {name: setup_list(value) for name, value in setup["options.package_data"].items()}
    root = REPO / "smartrelay"
    for folder in [root, *root.rglob("*")]:
        if folder.is_dir() and folder.name != "__pycache__":
            package = ".".join(folder.relative_to(REPO).parts)
            assert package in packages, f"{package} is not found as a package"
    for file in root.rglob("*"):
        if not file.is_file() or file.suffix in (".py", ".pyc") or "__pycache__" in file.parts:
            continue
        owners = [file.parent, *file.parent.parents]
        assert any(
            fnmatch(file.relative_to(owner).as_posix(), pattern)
            for owner in owners
            if owner.is_relative_to(root)
            for pattern in data.get(".".join(owner.relative_to(REPO).parts), [])
        ), f"{file} is not package data"
