"""Collect ``bench_*.py`` files when pytest is pointed at this directory.

The project's ``python_files`` pattern only matches ``test_*.py``; benchmark
modules are named ``bench_*`` so the default test run never imports them.
"""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is already collected by pytest itself.
    if file_path.name.startswith("bench_") and file_path.suffix == ".py" \
            and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
