"""Task plugins: loaded from files, modules and entry points; failures reported, not fatal."""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path

import pytest
import torch

from services.trainer.plugins import ENTRY_POINT_GROUP, load_tasks
from services.trainer.runs import RunManager
from services.trainer.settings import TrainerSettings
from services.trainer.tasks import TASKS
from tensorwire.rpc.config import load

DIGITS = Path(__file__).resolve().parents[4] / "examples" / "digits" / "task.py"


def test_the_digits_plugin_loads_and_trains() -> None:
    tasks, errors = load_tasks([str(DIGITS)], taken=TASKS, entry_points=False)
    assert errors == []
    task = tasks["digits"]
    config = task.configure({"batch_size": 32})
    data = task.make_data(config, seed=1)
    model = task.build_model(config)
    optimizer = task.make_optimizer(model, config)
    gen = torch.Generator().manual_seed(1)
    first = task.train_step(model, optimizer, task.sample_batch(data, config, gen))
    for _ in range(60):
        last = task.train_step(model, optimizer, task.sample_batch(data, config, gen))
    assert last["loss"] < first["loss"]
    with torch.inference_mode():
        view = task.build_view(model.eval(), data, config)
    assert view.kind == "images" and len(view.labels) == 32 and 0 <= view.meta["test_accuracy"] <= 1
    runs = RunManager(tasks={**TASKS, **tasks})
    assert "digits" in [t.name for t in runs.list_tasks()]


def test_the_digits_pictures_show_the_whole_test_sets_accuracy_a_slice_at_a_time() -> None:
    tasks, _ = load_tasks([str(DIGITS)], taken=TASKS, entry_points=False)
    task = tasks["digits"]
    config = task.configure({"batch_size": 32})
    data = task.make_data(config, seed=2)
    model = task.build_model(config).eval()
    optimizer = task.make_optimizer(model, config)
    gen = torch.Generator().manual_seed(2)
    for _ in range(40):
        task.train_step(model.train(), optimizer, task.sample_batch(data, config, gen))
    model.eval()
    _, (x, y) = data
    with torch.inference_mode():
        whole = int((model(x).argmax(1) == y).sum()) / len(x)
        seen = [task.build_view(model, data, config).meta["test_accuracy"] for _ in range(task.accuracy_chunks)]
        # a pass over the whole set, one slice per picture: then exactly the whole set's accuracy
        assert seen[-1] == pytest.approx(whole)
        # and it stays exact as the slices come round again
        assert task.build_view(model, data, config).meta["test_accuracy"] == pytest.approx(whole)
    assert 0 < whole < 1  # a partly trained model: right on some images, wrong on others


def test_broken_plugins_are_reported_with_file_and_line(tmp_path: Path) -> None:
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def broken(:\n    pass\n")
    raising = tmp_path / "raising.py"
    raising.write_text(textwrap.dedent("""\
        import math

        VALUE = 1 / 0
    """))
    clash = tmp_path / "clash.py"
    clash.write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(DIGITS.parent)!r})
        from task import DigitsTask

        class Spiral(DigitsTask):
            name = "spiral"
    """))
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    tasks, errors = load_tasks(
        [str(syntax), str(raising), str(clash), str(empty), str(tmp_path / "missing.py"),
         "no_such_module_xyz", str(DIGITS)],
        taken=TASKS, entry_points=False,
    )
    assert list(tasks) == ["digits"]  # the good one still loads
    text = [str(e) for e in errors]
    assert len(text) == 6, text
    assert f"{syntax}:1" in text[0] and "SyntaxError" in text[0]
    assert f"{raising}:3" in text[1] and "ZeroDivisionError" in text[1]
    assert "task name 'spiral' is taken already" in text[2]
    assert "defines no TASKS and no Task subclass" in text[3]
    assert "FileNotFoundError" in text[4]
    assert "ModuleNotFoundError" in text[5] and "no_such_module_xyz" in text[5]


def test_entry_points_are_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "my_plugin_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(DIGITS.read_text().replace('name = "digits"', 'name = "digits-ep"'))
    (package / "digits.py").write_text((DIGITS.parent / "digits.py").read_text())
    dist = tmp_path / "my_plugin_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\ndigits = my_plugin_pkg:DigitsTask\nbad = my_plugin_pkg:nothing_here\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    tasks, errors = load_tasks([], taken=TASKS)
    assert "digits-ep" in tasks
    assert any("entry point bad" in str(e) and "nothing_here" in str(e) for e in errors)


def test_task_module_flag_is_repeatable_and_has_an_env() -> None:
    settings = load(TrainerSettings, ["--task-module", "a.py", "--task-module", "b,c"], env={})
    assert settings.task_module == ("a.py", "b", "c")
    settings = load(TrainerSettings, [], env={"TENSORWIRE_TRAINER_TASK_MODULES": "x.py,y"})
    assert settings.task_module == ("x.py", "y")
