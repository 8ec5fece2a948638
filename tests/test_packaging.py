"""A regular (non-editable) install ships the same package: trainers/ and dataset_conversion/ mapped into it."""
import os
import subprocess
import sys
import zipfile

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, text=True)
    wheels = list(out.glob("nnunet_ssl-*.whl"))
    assert len(wheels) == 1
    site = out / "site"
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        z.extractall(site)
    return site, names


def test_wheel_contents(wheel_dir):
    _, names = wheel_dir
    for f in ("nnunet_ssl/trainers/nnUNetTrainerSSL.py", "nnunet_ssl/trainers/nnUNetTrainerMeanTeacher.py",
              "nnunet_ssl/nnunet_ext/nnunet_ssl_trainer_index.py", "nnunet_ssl/algorithms/ema.py",
              "nnunet_ssl/dataset_conversion/__init__.py", "nnunet_ssl/data/unlabeled.py", "nnunet_ssl/cli.py"):
        assert f in names, f
    assert not any(n.startswith(("tests/", "trainers/", "benchmarks/")) for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry


def test_installed_layout_imports_and_is_found_by_nnunet(wheel_dir):
    site, _ = wheel_dir
    # the development install's editable finder would win for the mapped sub-packages: switch it off
    code = ("import sys;"
            "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')];"
            "sys.path_hooks[:] = [h for h in sys.path_hooks if '__editable__' not in getattr(h, '__module__', '')];"
            "import nnunet_ssl.trainers as t, nnunet_ssl.dataset_conversion as d;"
            "from nnunet_ssl.nnunet_ext import TRAINER_DIR;"
            "import os; os.environ['nnUNet_extTrainer'] = TRAINER_DIR;"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f;"
            "c = f('nnUNetTrainerMeanTeacher');"
            "print(t.__file__); print(d.__file__); print(TRAINER_DIR); print(c.__module__)")
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                       cwd=str(site))  # not the repository: its source tree would shadow the wheel
    lines = r.stdout.strip().splitlines()[-4:]
    for line in lines[:3]:
        assert line.startswith(str(site)), (line, r.stderr)
    assert lines[3] == "nnunet_ssl.trainers.nnUNetTrainerMeanTeacher"


def test_console_script_help_lists_every_subcommand():
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnunet_ssl"), "--help"], capture_output=True,
                       text=True, check=True)
    for cmd in ("trainer-dir", "list-trainers", "preprocess-unlabeled", "plan-and-preprocess", "demo", "convert",
                "evaluate"):
        assert cmd in r.stdout
