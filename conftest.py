"""Load the harness plugins for every test directory (conformance/ and tests/)."""

pytest_plugins = (
    "fixtures.plugins.harness",
    "fixtures.plugins.vfio_user",
    "fixtures.plugins.vhost_user",
    "fixtures.plugins.guest",
    "fixtures.plugins.rig",
)
