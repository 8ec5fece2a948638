"""nnunet_ssl.algorithms is pure torch: no module under it may import nnunetv2."""
import ast
import pathlib

import nnunet_ssl.algorithms as algorithms


def test_no_nnunetv2_imports_in_algorithms():
    root = pathlib.Path(algorithms.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) >= 5
    offenders = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{f.name}: {n}" for n in names if n.split(".")[0] in ("nnunetv2", "batchgenerators",
                                                                                 "batchgeneratorsv2")]
    assert offenders == []
