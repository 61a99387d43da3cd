"""Package discovery only; everything else is in pyproject.toml.

configs/ sits at the top of the repository (DESIGN.md section 2) but is installed as the
package ``vidgen.configs`` so that editable and regular installs find it the same way.
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["vidgen", "vidgen.*", "workers", "workers.*"]),
        "vidgen.configs",
    ],
    package_dir={"vidgen.configs": "configs"},
)
