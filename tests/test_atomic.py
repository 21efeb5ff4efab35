"""t2dist.atomic: a failed write leaves the old content; a finished one replaces it whole."""
import json

import pytest

from t2dist.atomic import atomic_dir, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path):
    p = tmp_path / "sub" / "summary.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [q.name for q in p.parent.iterdir()] == ["summary.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_text(p, "old")
    with pytest.raises(TypeError):
        atomic_write_json(p, {"not json": object()})
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]


def test_atomic_dir_commits_only_on_success(tmp_path):
    d = tmp_path / "expert"
    with atomic_dir(d) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (d / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("crash while filling")
    assert (d / "a.txt").read_text() == "1"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["expert"]


def test_atomic_dir_exists_policies(tmp_path):
    d = tmp_path / "cache"
    with atomic_dir(d) as tmp:
        (tmp / "v").write_text("first")
    with atomic_dir(d, exists="keep") as tmp:
        (tmp / "v").write_text("second")
    assert (d / "v").read_text() == "first"
    with atomic_dir(d, exists="replace") as tmp:
        (tmp / "v").write_text("third")
    assert (d / "v").read_text() == "third"
    with pytest.raises(FileExistsError):
        with atomic_dir(d, exists="error"):
            pass
    assert sorted(q.name for q in tmp_path.iterdir()) == ["cache"]
