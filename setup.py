"""Build script for Flowcraft.  All metadata lives in setup.cfg.

Only the package list is computed here: setup.cfg's ``packages = find:``
accepts a single ``where`` directory, but the adapters live under
``adapters/`` and install as top-level packages (``flowcraft_redis``,
``flowcraft_rabbitmq``, ...).  Every ``flowcraft*`` package under either root
is picked up, so new subpackages and new adapters need no edit here.
"""
from setuptools import find_packages, setup

CORE = find_packages(".", include=["flowcraft*"])
ADAPTERS = find_packages("adapters", include=["flowcraft*"])

setup(
    packages=CORE + ADAPTERS,
    # Subpackages of an adapter resolve through their top-level mapping.
    package_dir={name: "adapters/" + name for name in ADAPTERS if "." not in name},
)
