"""play.ipynb, executed headless on logs that short real training runs wrote."""

import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image  # a dependency of matplotlib itself

import train_gpt2 as tg
from conftest import HELLASWAG_SLICE, ROOT, TINY, make_shards

NOTEBOOK = os.path.join(ROOT, "play.ipynb")


def train(tmp_path, hellaswag):
    """A 4-step tiny run evaluating every step, as the real trainer logs it; returns log.txt."""
    data, log_dir = tmp_path / "data", tmp_path / "log"
    make_shards(data, [3000, 9000])
    args = ["--data_dir", str(data), "--log_dir", str(log_dir), "--max_steps", "4"]
    args += ["--total_batch_size", "64", "--eval_interval", "1", "--val_loss_steps", "1"]
    # a high learning rate from step 1, so the losses move; short samples keep it fast
    args += ["--max_lr", "1e-2", "--warmup_steps", "1"]
    args += ["--num_return_sequences", "1", "--max_length", "12"]
    if hellaswag:
        hellaswag_8 = tmp_path / "hellaswag_8.jsonl"
        hellaswag_8.write_text("".join(open(HELLASWAG_SLICE).readlines()[:8]))
        args += ["--hellaswag", "1", "--hellaswag_path", str(hellaswag_8), "--block_size", "128"]
    tg.main(TINY + args)
    return log_dir / "log.txt"


@pytest.fixture(scope="module")
def loss_log(tmp_path_factory):
    """The log of a run without HellaSwag, like the default CPU run: train and val lines."""
    return train(tmp_path_factory.mktemp("loss_run"), hellaswag=False)


@pytest.fixture(scope="module")
def hella_log(tmp_path_factory):
    return train(tmp_path_factory.mktemp("hella_run"), hellaswag=True)


@pytest.fixture(scope="module")
def core_log(tmp_path_factory):
    """A log with CORE and bits-per-byte lines, as --core N --bpb 1 write them (test_core.py
    checks that the loop writes them so)."""
    log_file = tmp_path_factory.mktemp("core_run") / "log" / "log.txt"
    log_file.parent.mkdir()
    lines = [f"{s} train {10 - s:.6f}\n" for s in range(5)]
    lines += [
        f"{s} {k} {v:.4f}\n"
        for s in range(5)
        for k, v in (("val", 10.5 - s), ("bpb", 3.5 - s / 4), ("core", s / 100))
    ]
    log_file.write_text("".join(lines))
    return log_file


def execute(log_file):
    """Runs play.ipynb top to bottom in a fresh kernel with PLAY_LOG=log_file; returns the
    outputs of its cells and their stdout. A cell that raises fails the test here."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # kernel "python3" from this environment: jupyter_client runs its "python" as sys.executable
    client = NotebookClient(nb, timeout=120, kernel_name="python3")
    client.execute(cwd=os.getcwd(), env=dict(os.environ, PLAY_LOG=str(log_file)))
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    stdout = "".join(o.text for o in outputs if o.get("name") == "stdout")
    return outputs, stdout


def read_streams(log_file):
    """{kind: {step: value}} of a log.txt, parsed independently of the notebook (last wins)."""
    streams = {}
    for line in open(log_file).read().splitlines():
        step, kind, value = line.split(" ")
        streams.setdefault(kind, {})[int(step)] = float(value)
    return streams


def printed(stdout, label):
    """(value, step) from a line like 'min val loss: 10.8328 at step 3 (...)'."""
    match = re.search(rf"^{label}: (\d+\.\d+) at step (\d+)", stdout, re.M)
    assert match, f"no '{label}' line in:\n{stdout}"
    return float(match[1]), int(match[2])


def check_best(stdout, streams, label, kind, pick):
    value, step = printed(stdout, label)
    assert value == pick(streams[kind].values())
    assert streams[kind][step] == value


def check_png(outputs, log_file, panels):
    """loss.png beside the log: a real PNG of a sensible size with one or two panels drawn."""
    check_png_at(outputs, log_file.parent / "loss.png", panels)


def check_png_at(outputs, png, panels):
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert 300 <= height <= 1000 and 500 <= width <= 2500, image.size
    assert (width / height > 2.4) == (panels > 1), image.size  # side by side
    assert len(colors) > 20  # lines, text and antialiasing, not a blank canvas
    assert os.path.getsize(png) < 300_000  # small enough to commit
    # the figure shows inline in Jupyter as well
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_loss_log_without_hellaswag(loss_log):
    streams = read_streams(loss_log)
    assert set(streams) == {"train", "val"} and len(streams["val"]) == 5
    assert len(set(streams["val"].values())) > 1  # the run learned: the minimum means something
    outputs, stdout = execute(loss_log)
    check_best(stdout, streams, "min train loss", "train", min)
    check_best(stdout, streams, "min val loss", "val", min)
    assert "HellaSwag was not run" in stdout and "max HellaSwag" not in stdout
    check_png(outputs, loss_log, panels=1)


def test_log_with_hellaswag(hella_log):
    streams = read_streams(hella_log)
    assert set(streams) == {"train", "val", "hella"} and len(streams["hella"]) == 5
    outputs, stdout = execute(hella_log)
    check_best(stdout, streams, "min train loss", "train", min)
    check_best(stdout, streams, "min val loss", "val", min)
    check_best(stdout, streams, "max HellaSwag", "hella", max)
    assert "not run" not in stdout
    check_png(outputs, hella_log, panels=2)


def test_log_with_core_and_bits_per_byte(core_log):
    streams = read_streams(core_log)
    assert set(streams) == {"train", "val", "bpb", "core"} and len(streams["core"]) == 5
    outputs, stdout = execute(core_log)
    check_best(stdout, streams, "min val bits per byte", "bpb", min)
    check_best(stdout, streams, "max CORE", "core", max)
    check_png(outputs, core_log, panels=2)


def test_repeated_steps_keep_the_last_value(loss_log, tmp_path):
    # A log where steps 2.. were logged by a first run (absurdly good values) and then again by
    # a later one that went on from step 2, ending in the half-written line of a run in progress:
    # the later values win and the partial line is skipped.
    lines = open(loss_log).read().splitlines()
    first_run = [f"{line.split()[0]} {line.split()[1]} 0.5" for line in lines]
    first_run = [line for line in first_run if int(line.split()[0]) >= 2]
    early = [line for line in lines if int(line.split()[0]) < 2]
    later = [line for line in lines if int(line.split()[0]) >= 2]
    log_file = tmp_path / "log.txt"
    log_file.write_text("\n".join(early + first_run + later) + "\n5 tra")
    streams = read_streams(loss_log)
    outputs, stdout = execute(log_file)
    check_best(stdout, streams, "min train loss", "train", min)
    check_best(stdout, streams, "min val loss", "val", min)
    assert "skipped 1 unreadable line(s)" in stdout
    check_png(outputs, log_file, panels=1)


@pytest.mark.parametrize("content", [None, "", "\n"], ids=["missing", "empty", "blank"])
def test_missing_or_empty_log_says_so_in_one_line(tmp_path, content):
    log_file = tmp_path / "log" / "log.txt"
    if content is not None:
        log_file.parent.mkdir()
        log_file.write_text(content)
    outputs, stdout = execute(log_file)
    assert stdout.count("\n") == 1 and str(log_file) in stdout, stdout
    assert "python train_gpt2.py" in stdout
    assert [o.output_type for o in outputs] == ["stream"]  # no figure, no traceback
    assert not (tmp_path / "log" / "loss.png").exists()


def test_committed_notebook_has_no_outputs():
    with open(NOTEBOOK) as f:
        raw = json.load(f)
    nbformat.validate(nbformat.reads(json.dumps(raw), as_version=4))
    code = [cell for cell in raw["cells"] if cell["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"][:1]
        assert "execution" not in cell["metadata"]  # no timings left by Jupyter either
    assert raw["metadata"]["kernelspec"]["name"] == "python3"


def test_two_logs_on_the_same_axes(loss_log, hella_log, tmp_path):
    # two runs, named after their directories: "log" twice here, so copies under other names
    runs = {}
    for name, log_file in (("first", loss_log), ("second", hella_log)):
        (tmp_path / name).mkdir()
        runs[name] = tmp_path / name / "log.txt"
        runs[name].write_text(open(log_file).read())
    outputs, stdout = execute(f"{runs['first']},{runs['second']}")
    blocks = stdout.split(f"second ({runs['second']}):\n")
    assert blocks[0].startswith(f"first ({runs['first']}):\n") and len(blocks) == 2
    for block, log_file in zip(blocks, (loss_log, hella_log)):
        streams = read_streams(log_file)
        check_best(block, streams, "min val loss", "val", min)
    check_best(blocks[1], read_streams(hella_log), "max HellaSwag", "hella", max)
    assert "HellaSwag was not run" in blocks[0]
    check_png_at(outputs, tmp_path / "first" / "compare.png", panels=2)
    assert not (tmp_path / "first" / "loss.png").exists()
