"""Build hook: the generated `turnlog.v1` modules go into standard wheels, not editable ones.

In the repository they live in gen/turnlog/v1 (shared with the server); in
an sdist, in turnlog/v1 beside this file. An editable install finds them on
the path already (the server's editable install puts gen/ there), so
copying them into site-packages would only leave a copy to go stale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class GeneratedModulesHook(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        root = Path(self.root)
        for source in (root / "../../gen/turnlog/v1", root / "turnlog/v1"):
            if source.is_dir():
                build_data["force_include"][str(source.resolve())] = "turnlog/v1"
                return
        raise FileNotFoundError(
            "the generated turnlog/v1 modules are missing: run proto/generate.py"
        )
