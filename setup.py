"""The wheel's contents; everything else about the package is in pyproject.toml.

Our packages are found by name. The files the code reads at run time, the bundled configs and
the prompts they name, go into the wheel inside `core`, under core/_project/ in the checkout's
layout (configs/, configs/paper/, data/prompts/), where core/project_files.py finds them when
there is no checkout. Files a package reads beside its own modules (the LLM judge's default
templates) are its package data (PACKAGE_DATA). tests/test_wheel.py builds the wheel and runs it installed.
"""

from setuptools import find_packages, setup

# Package data of ours, as packages mapped onto the checkout's folders: {package: (folder, files)}.
BUNDLED = {
    "core._project.configs": ("configs", ["*.yaml"]),
    "core._project.configs.paper": ("configs/paper", ["*.yaml"]),
    "core._project.data.prompts": ("data/prompts", ["*.jsonl"]),
}
# Files our packages read from their own folders: {package: patterns}.
PACKAGE_DATA = {
    "rewards": ["judge_templates/*.txt"],
}

setup(
    packages=find_packages(include=["core", "core.*", "pipeline", "pipeline.*", "stages", "stages.*",
                                    "rewards", "rewards.*", "pools", "pools.*"]) + list(BUNDLED),
    package_dir={package: folder for package, (folder, _) in BUNDLED.items()},
    package_data={**{package: files for package, (_, files) in BUNDLED.items()}, **PACKAGE_DATA},
)
