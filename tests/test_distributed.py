"""torchrun with gloo on the CPU: 2 processes must train exactly like 1 process with twice the
gradient accumulation (same data per step, same averaged gradients)."""

import torch

from conftest import (
    FAULTS,
    TINY,
    log_lines,
    make_shards,
    no_traceback_of_ours,
    run_training,
    torchrun,
)
from support import checkpoints


def test_two_processes_equal_one_with_twice_the_accumulation(two_runs):
    root, _, out1, out2 = two_runs
    for kind in ("train", "val"):
        one, two = log_lines(root / "one", kind), log_lines(root / "two", kind)
        assert [s for s, _ in one] == [s for s, _ in two] and len(one) >= 4
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(one, two)), (kind, one, two)
    # HellaSwag: examples split over the ranks, counts summed
    assert log_lines(root / "one", "hella") == log_lines(root / "two", "hella")
    counts = [line for line in out2.splitlines() if line.startswith("HellaSwag accuracy")]
    assert counts and all(
        c.endswith(f"/10={int(c.split(': ')[1].split('/')[0]) / 10:.4f}") for c in counts
    )
    # only the master prints its steps
    assert out2.count("step     3 |") == 1 and out1.count("step     3 |") == 1
    a = torch.load(root / "one" / "model_00004.pt", weights_only=True)["model"]
    b = torch.load(root / "two" / "model_00004.pt", weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_torchrun_restarts_a_killed_worker_and_the_job_ends_as_an_uninterrupted_one(two_runs):
    root, args, _, _ = two_runs
    log_dir = root / "restarted"
    # a checkpoint at every step, the newest 2 and the milestones kept; rank 1 killed as step 6
    # begins, in the first attempt only: torchrun restarts both ranks, which resume at step 6
    again = args + ["--log_dir", str(log_dir), "--resume", "auto", "--keep_checkpoints", "2"]
    again += ["--checkpoint_minutes", "1e-9"]
    code, out, _ = torchrun(again, root, "kill_at_step:6:1", timeout=240, restarts=2)
    assert code == 0, out[-3000:]
    assert out.count("fault: sent SIGKILL") == 1 and "resumed from" in out
    for kind in ("train", "val", "hella"):
        assert log_lines(log_dir, kind) == log_lines(root / "two", kind), kind  # to the bit
    assert checkpoints.checkpoint_steps(str(log_dir)) == [4, 8, 11, 12]
    a = torch.load(root / "two" / "model_00012.pt", weights_only=True)["model"]
    b = torch.load(log_dir / "model_00012.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_that_a_stalled_rank_cannot_agree_to_ends_the_others_in_one_line(two_runs):
    # rank 1 stops (SIGSTOP) as step 6 begins; rank 0, waiting for it in a collective, gets
    # SIGTERM 2 s later: it ends within seconds, naming the newest checkpoint, long before the
    # stalled rank is killed (20 s after it stopped; without the watch rank 0 would wait for
    # that and die of gloo's connection error)
    root, args, _, _ = two_runs
    log_dir = root / "stalled"
    code, out, _ = torchrun(args + ["--log_dir", str(log_dir)], root, "stall_at_step:6")
    assert code != 0 and no_traceback_of_ours(out), out[-3000:]
    newest = log_dir / "model_00004.pt"
    line = "rank 0: stopped by SIGTERM without saving: rank 1 does not answer, so no step can be "
    line += f"agreed on; the last checkpoint saved is {newest}"
    assert out.count(line) == 1 and "Connection closed" not in out, out[-3000:]
    assert checkpoints.checkpoint_steps(str(log_dir)) == [4]


def test_a_rank_killed_mid_run_ends_the_others_in_one_line(two_runs):
    # without restarts: rank 0's next collective fails on gloo's lost connection
    root, args, _, _ = two_runs
    log_dir = root / "lost"
    code, out, _ = torchrun(args + ["--log_dir", str(log_dir)], root, "kill_at_step:6:1")
    assert code != 0 and no_traceback_of_ours(out), out[-3000:]
    line = "rank 0: a collective failed, another rank is gone ("
    newest = f"); the last checkpoint saved is {log_dir / 'model_00004.pt'}"
    assert [s for s in out.splitlines() if s.startswith(line) and s.endswith(newest)], out[-3000:]


SMALL = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--B", "2", "--T", "64"]
SMALL += ["--total_batch_size", "256", "--val_loss_steps", "1", "--device", "cpu"]


def test_torchrun_without_data_says_so_and_bundled_trains(tmp_path):
    # no edu_fineweb10B in the working directory: a cluster run must not fall back silently
    code, out, seconds = torchrun(["--max_steps", "2"] + SMALL, tmp_path)
    assert code != 0 and no_traceback_of_ours(out)
    message = "no FineWeb shards in edu_fineweb10B/: make them with `python fineweb.py`"
    assert out.count(message) == 1
    code, out, _ = torchrun(["--max_steps", "2", "--data_dir", "bundled"] + SMALL, tmp_path)
    assert code == 0, out
    assert "bundled corpus" in out and "done: 2 steps" in out
    assert len(log_lines(tmp_path / "log", "train")) == 2


def test_a_failure_on_one_rank_stops_every_rank_in_one_line(tmp_path):
    data = tmp_path / "data"
    make_shards(data, [6000, 30000, 3000])
    args = ["--max_steps", "2", "--data_dir", str(data)] + SMALL
    # the bundled corpus cannot be written on local rank 0 (a read-only checkout, a full disk)
    code, out, seconds = torchrun(
        ["--max_steps", "2", "--data_dir", "bundled"] + SMALL, tmp_path, "disk_full_writing_shards:"
    )
    assert code != 0 and seconds < 60 and no_traceback_of_ours(out)
    assert out.count("cannot write the bundled corpus's token shards") == 1
    # rank 1 sees one train shard fewer (a node whose copy of the data is incomplete)
    code, out, seconds = torchrun(args, tmp_path, "fewer_shards::1")
    assert code != 0 and seconds < 60 and no_traceback_of_ours(out)
    assert out.count("the ranks see different shards in") == 1
    assert "rank 0: 2 + 1 shards, rank 1: 1 + 1 shards" in out


def test_a_failure_of_every_rank_is_said_once_per_node(tmp_path):
    # every rank finds, as it builds the model, that the recipe cannot have this shape: the
    # node's first process says so in one line, the other exits quietly
    args = TINY + ["--data_dir", "bundled", "--recipe", "speedrun", "--n_embd", "30"]
    code, out, _ = torchrun(args + ["--max_steps", "2"], tmp_path)
    assert code != 0 and no_traceback_of_ours(out)
    assert out.count("the speedrun recipe's rotary embeddings need an even head size") == 1


def test_hellaswag_unavailable_on_rank_0_only_is_off_on_every_rank(tmp_path):
    # HellaSwag is on by default for shard data; the download fails on rank 0's node only
    data = tmp_path / "data"
    make_shards(data, [6000, 30000])
    args = ["--max_steps", "2", "--data_dir", str(data), "--eval_interval", "1"] + SMALL
    code, out, seconds = torchrun(
        args + ["--log_dir", str(tmp_path / "log")], tmp_path, "hellaswag_offline::0"
    )
    assert code == 0, out
    assert out.count("HellaSwag is off for this run: could not download") == 1
    assert [s for s, _ in log_lines(tmp_path / "log", "val")] == [0, 1, 2]
    assert log_lines(tmp_path / "log", "hella") == []


def test_sigterm_to_one_rank_stops_all_at_the_same_step_and_resumes(two_runs, tmp_path):
    root, args, _, _ = two_runs
    expected = open(root / "two" / "log.txt").read()
    # a preemption of rank 1 alone, as its step 6 begins: the ranks agree between micro-steps
    log_dir = tmp_path / "stopped"
    code, out, _ = torchrun(args + ["--log_dir", str(log_dir)], tmp_path, "signal_at_step:6:1")
    assert code != 0 and no_traceback_of_ours(out)
    assert out.count("stopped by SIGTERM after step 5") == 1 and "--resume latest" in out
    assert checkpoints.checkpoint_steps(str(log_dir)) == [4, 6]  # the scheduled one, and the stop's
    run_training(["--resume", "latest", "--log_dir", str(log_dir)], 2, tmp_path)
    assert open(log_dir / "log.txt").read() == expected


def test_speedrun_two_processes_equal_one_with_twice_the_accumulation(tmp_path):
    data = tmp_path / "data"
    make_shards(data, [6000, 30000])
    # every switch on: the default ones, and multi-token prediction (off by default)
    args = TINY + ["--recipe", "speedrun", "--mtp", "1", "--data_dir", str(data)]
    args += ["--total_batch_size", "512", "--max_steps", "4", "--eval_interval", "2"]
    args += ["--val_loss_steps", "1"]
    args += ["--num_return_sequences", "0", "--checkpoint_interval", "4"]
    # in float64: in float32, Muon (which orthogonalizes each gradient) and AdamW (eps 1e-10,
    # dividing by the gradient's size) amplify the rounding differences of the two ways of summing
    # the tiny early gradients (the blocks' outputs and the head start at zero) to about 1e-3 of
    # the weights, by an amount that depends on the CPU's instruction set
    run_training(args + ["--log_dir", str(tmp_path / "one")], 1, tmp_path, FAULTS, FLOAT64="1")
    run_training(args + ["--log_dir", str(tmp_path / "two")], 2, tmp_path, FAULTS, FLOAT64="1")
    for kind in ("train", "val"):
        one, two = log_lines(tmp_path / "one", kind), log_lines(tmp_path / "two", kind)
        assert [s for s, _ in one] == [s for s, _ in two]
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(one, two)), (kind, one, two)
    a = torch.load(tmp_path / "one" / "model_00004.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model_00004.pt", weights_only=True)
    pairs = [(a["model"][k], b["model"][k]) for k in a["model"]]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()  # Muon's momentum and AdamW's moments, on both
    pairs += [(sa[i][k], sb[i][k]) for i in sa for k in sa[i] if k != "step"]
    assert a["model"]["lm_head.weight"].dtype == torch.float64
    # float32's 1e-7 became 1e-3 in float32 runs (an amplification of 1e4); float64's 1e-16, so
    # amplified, is 1e-12: the bound leaves a factor of 1000
    assert max(((u - v).norm() / u.norm()).item() for u, v in pairs) < 1e-9
