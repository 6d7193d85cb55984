"""`quickloris bench`: the benchmarks come from the source checkout (benchmarks/), never from the wheel; without a
checkout, or with another `benchmarks` package first on the path, it says so in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from quickloris.cli import bench as cli_bench
from quickloris.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_the_checkout_is_found_and_the_area_module_loads():
    assert cli_bench.checkout_root() == ROOT
    module = cli_bench.load_area("train")
    assert Path(module.__file__) == ROOT / "benchmarks" / "train" / "bench.py"
    assert callable(module.add_arguments) and callable(module.run)


def test_an_installed_layout_has_no_checkout(tmp_path):
    site = tmp_path / "lib" / "python3.12" / "site-packages" / "quickloris" / "cli" / "bench.py"
    (tmp_path / "lib" / "python3.12" / "benchmarks").mkdir(parents=True)  # even a stray folder of that name
    (tmp_path / "lib" / "python3.12" / "benchmarks" / "__init__.py").write_text("")
    assert cli_bench.checkout_root(site) is None
    clone = tmp_path / "clone"
    (clone / "benchmarks").mkdir(parents=True)
    assert cli_bench.checkout_root(clone / "src" / "quickloris" / "cli" / "bench.py") is None  # no package there
    (clone / "benchmarks" / "__init__.py").write_text("")
    assert cli_bench.checkout_root(clone / "src" / "quickloris" / "cli" / "bench.py") == clone.resolve()


def test_without_a_checkout_one_line_says_where_the_benchmarks_are(monkeypatch, capsys):
    monkeypatch.setattr(cli_bench, "checkout_root", lambda: None)
    assert main(["bench", "train", "--tiny"]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "source tree" in out and "not with the installed package" in out


@pytest.fixture
def isolated_benchmarks_modules():
    saved = {k: v for k, v in sys.modules.items() if k == "benchmarks" or k.startswith("benchmarks.")}
    for k in saved:
        del sys.modules[k]
    yield
    for k in [k for k in sys.modules if k == "benchmarks" or k.startswith("benchmarks.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_another_benchmarks_package_first_on_the_path_is_refused(
    tmp_path, monkeypatch, isolated_benchmarks_modules, capsys
):
    (tmp_path / "benchmarks" / "train").mkdir(parents=True)
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "train" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "train" / "bench.py").write_text("def add_arguments(p): pass\ndef run(a): return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["bench", "train"]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "another package of that name" in out and str(tmp_path) in out


def test_the_wheel_packages_the_library_only():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]
    assert config["wheel"]["packages"] == ["src/quickloris"]  # benchmarks/ is not under src/quickloris
    assert not (ROOT / "src" / "quickloris" / "bench").exists()
    assert (ROOT / "benchmarks" / "train" / "bench.py").is_file()
