"""Root conftest: registers the fixture plugins shared by every test module."""

pytest_plugins = ["tests.fakes.fixtures", "tests.proxy_fixtures", "tests.canary"]
