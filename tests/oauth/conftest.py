"""One real ``jitbroker dev`` with ``[oauth]`` for the session (JITBROKER_BIN), on free loopback
ports; every test talks to it only through independent OAuth clients."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from oauthenv import OAuthBroker, oauth_broker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthBroker]:
    with oauth_broker(os.environ.get("JITBROKER_BIN"), tmp_path_factory.mktemp("broker")) as env:
        try:
            yield env
        finally:
            if os.environ.get("JITBROKER_TEST_SHOW_LOG"):
                print(env.dev.log_tail(200))
