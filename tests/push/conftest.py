from tests.fixtures.gateway import gateway  # noqa: F401 (fixture)
