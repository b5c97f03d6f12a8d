"""Load the harness plugins for every test directory (conformance/ and tests/)."""

pytest_plugins = (
    "fixtures.plugin",
    "fixtures.vfio_user_plugin",
    "fixtures.guest_plugin",
)
