"""Package layout: the top-level folders callbacks/ and recipes/ are installed as the
sub-packages ``prh_lightning.callbacks`` and ``prh_lightning.recipes`` (in a wheel they sit
inside the package; an editable install maps them with setuptools' import finder)."""
from setuptools import find_packages, setup

core = find_packages(include=["prh_lightning", "prh_lightning.*"])
setup(
    packages=core + ["prh_lightning.callbacks", "prh_lightning.recipes"],
    package_dir={"prh_lightning.callbacks": "callbacks", "prh_lightning.recipes": "recipes"},
    package_data={"prh_lightning": ["py.typed"]},
)
