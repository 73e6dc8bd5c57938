"""Hydra search-path plug-in of fedlora-test-plugin (found by Hydra's plug-in scan)."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class FedloraTestPluginSearchPath(SearchPathPlugin):
    """Adds pkg://fedlora_test_plugin.conf: `strategy=frozenb` then selects the plug-in."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="fedlora-test-plugin",
                           path="pkg://fedlora_test_plugin.conf")
