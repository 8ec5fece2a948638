"""``nnunet_ssl demo`` keeps its work folder, replaces only a folder it made itself, and says where things are."""
import pytest

from nnunet_ssl.demo import DEFAULT_FOLDER, MARKER, DemoError, prepare_work_folder, run_demo


def test_a_new_folder_is_created_and_marked(tmp_path):
    work = tmp_path / "a" / "demo"
    prepare_work_folder(str(work))
    assert (work / MARKER).is_file()


def test_an_earlier_demo_folder_is_replaced(tmp_path):
    work = tmp_path / "demo"
    prepare_work_folder(str(work))
    (work / "results" / "Dataset979_SSLDemo").mkdir(parents=True)
    (work / "logs").mkdir()
    (work / "logs" / "train.log").write_text("old")
    prepare_work_folder(str(work))
    assert sorted(p.name for p in work.iterdir()) == [MARKER]


def test_a_folder_the_demo_did_not_make_is_never_touched(tmp_path, capsys):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "results").mkdir()
    (work / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError, match=f"{work} exists and is not empty, and no earlier demo made it"):
        prepare_work_folder(str(work))
    assert run_demo(str(work)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nnunet_ssl: error: {work} exists and is not empty") and "-o" in err
    assert sorted(p.name for p in work.iterdir()) == ["results", "thesis.tex"]


def test_the_default_folder_is_named_and_kept():
    from nnunet_ssl.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.output == DEFAULT_FOLDER == "nnunet_ssl_demo"
