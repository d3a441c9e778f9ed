"""Trainers as users run them: subprocesses, `kill -9` and resume, `torchrun` with two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (assert_ranks_in_sync, assert_same_losses, kill_then_resume, losses, read_metrics, run_trainer,
                      tiny_flags, torchrun, trainer_command)


def test_sigkill_then_resume_continues_exactly(small_data, tmp_path):
    """Kill -9 at several moments (saves happen every step, so some kills land mid-save); each
    `--from_resume 1` continues, and every step's loss equals the uninterrupted run's."""
    reference = tmp_path / "reference"
    run_trainer("train_pretrain.py", tiny_flags(reference, small_data["pretrain"], "--epochs", "2"))
    expected = losses(reference / "out" / "pretrain_64.metrics.jsonl")
    assert len(expected) >= 12

    killed = tmp_path / "killed"
    flags = tiny_flags(killed, small_data["pretrain"], "--epochs", "2", "--save_interval", "1", "--from_resume", "1")
    resumed = kill_then_resume("train_pretrain.py", flags, killed / "out" / "pretrain_64.metrics.jsonl",
                               [3, 7, len(expected) // 2 + 3])
    assert resumed.keys() == expected.keys()
    for step, loss in expected.items():
        assert abs(resumed[step] - loss) <= 1e-5, f"step {step}: {resumed[step]} vs {loss}"


def test_half_written_checkpoint_is_never_loaded(small_data, tmp_path):
    flags = tiny_flags(tmp_path, small_data["pretrain"], "--max_steps", "3", "--from_resume", "1")
    run_trainer("train_pretrain.py", flags)
    checkpoint = tmp_path / "ckpt" / "pretrain_64_resume.pth"
    good = checkpoint.read_bytes()
    # What a kill during a save leaves behind: a partial temporary file next to the last good checkpoint.
    (tmp_path / "ckpt" / f".{checkpoint.name}.tmp12345").write_bytes(good[: len(good) // 2])
    result = run_trainer("train_pretrain.py", flags[:-4] + ["--max_steps", "5", "--from_resume", "1"])
    assert "resumed from" in result.stdout + result.stderr
    assert max(losses(tmp_path / "out" / "pretrain_64.metrics.jsonl")) == 5


def test_resume_without_checkpoint_starts_fresh_and_says_so(small_data, tmp_path):
    result = run_trainer("train_pretrain.py", tiny_flags(tmp_path, small_data["pretrain"], "--max_steps", "2",
                                                         "--from_resume", "1"))
    assert "starting fresh" in result.stdout + result.stderr


def test_demo_data_fallback_is_announced_on_the_first_line(tmp_path):
    flags = tiny_flags(tmp_path, Path("unused"), "--max_steps", "1")
    flags = flags[:2] + flags[4:]  # no --data_path
    result = run_trainer("train_pretrain.py", flags)
    assert result.stdout.splitlines()[0].startswith("[demo data]")


def test_pretrain_then_sft_outputs_and_metrics(small_data, tmp_path):
    run_trainer("train_pretrain.py", tiny_flags(tmp_path, small_data["pretrain"], "--max_steps", "4"))
    out = tmp_path / "out"
    assert (out / "pretrain_64.pth").exists() and (out / "pretrain_64.json").exists()
    run_trainer("train_full_sft.py", tiny_flags(tmp_path, small_data["sft"], "--max_steps", "3"))
    records = [json.loads(line) for line in (out / "full_sft_64.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s"):
        assert key in records[-1]
    assert records[-1]["tokens"] > records[0]["tokens"] > 0
    # --max_steps caps the run, not the schedule: LR has not decayed to its 10% floor.
    assert records[-1]["lr"] > 0.5 * 1e-6


def test_torchrun_two_processes_pretrain_and_sft_stay_in_sync(small_data, tmp_path):
    torchrun("train_pretrain.py", tiny_flags(tmp_path, small_data["pretrain"], "--max_steps", "4"))
    torchrun("train_full_sft.py", tiny_flags(tmp_path, small_data["sft"], "--max_steps", "3"))
    for stem in ("pretrain_64", "full_sft_64"):
        assert_ranks_in_sync(tmp_path / "ckpt", stem)



def test_torchrun_resume_after_a_kill_between_the_ranks_saves(small_data, tmp_path):
    """A kill after rank 0 saved step 4 but before rank 1 did: rank 1's latest state is step 3. The
    resumed run takes both ranks back to step 3 (rank 0 from its previous file) and repeats step 4 exactly."""
    flags = tiny_flags(tmp_path, small_data["pretrain"], "--save_interval", "1", "--from_resume", "1")
    torchrun("train_pretrain.py", flags + ["--max_steps", "4"])
    metrics = tmp_path / "out" / "pretrain_64.metrics.jsonl"
    first = losses(metrics)
    rank1 = tmp_path / "ckpt" / "pretrain_64_resume_rank1.pth"
    rank1_previous = rank1.with_name("pretrain_64_resume_rank1.previous.pth")
    assert torch.load(rank1_previous, weights_only=False)["step"] == 3
    os.replace(rank1_previous, rank1)  # rank 1 never wrote step 4
    result = torchrun("train_pretrain.py", flags + ["--max_steps", "6"])
    assert "all go back to step 3" in result.stdout + result.stderr
    resumed = losses(metrics)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert abs(resumed[4] - first[4]) <= 1e-5
    assert_ranks_in_sync(tmp_path / "ckpt", "pretrain_64")


def wandb_history(run_file: Path) -> list[dict]:
    """The rows `wandb.log` wrote to an offline run's transaction log (`run-<id>.wandb`): a LevelDB-style
    log (32 KiB blocks; each record a 7-byte header of checksum, length and kind, split across blocks
    when long) of wandb's protobuf `Record`s, after a 7-byte ":W&B" file header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, header, position, pending, rows = 32768, 7, 7, b"", []
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + header])
        pending += data[position + header:position + header + length]
        position += header + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_use_wandb_logs_offline_and_resumes_the_same_run(small_data, tmp_path, monkeypatch):
    """Offline wandb: a resumed run continues the same wandb run, and wandb gets what the metrics file
    gets, validation included (as does the progress bar)."""
    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)  # no credentials: offline mode
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(small_data["pretrain"].read_text(encoding="utf-8").splitlines(True)[-10:]), encoding="utf-8")
    flags = tiny_flags(tmp_path, small_data["pretrain"], "--max_steps", "2", "--use_wandb", "--from_resume", "1",
                       "--eval_data", str(held_out), "--eval_interval", "2")
    first = run_trainer("train_pretrain.py", flags)
    flags[flags.index("--max_steps") + 1] = "4"
    run_trainer("train_pretrain.py", flags)
    runs = sorted((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]  # one run id, resumed
    logged = {row["step"]: row for run in runs for row in wandb_history(next(run.glob("*.wandb")))}
    metrics = {r["step"]: r for r in read_metrics(tmp_path / "out" / "pretrain_64.metrics.jsonl")}
    assert sorted(logged) == sorted(metrics) == [1, 2, 3, 4]
    for step in (2, 4):
        for key in ("loss", "val_loss", "val_bpb"):
            assert logged[step][key] == pytest.approx(metrics[step][key], rel=1e-12), (step, key)
    assert "val_loss" not in logged[1] and "val_loss" not in logged[3]
    assert f"val={metrics[2]['val_loss']:.4f}" in first.stderr  # the progress bar


def test_a_malformed_line_stops_the_run_naming_file_and_line_before_any_output(small_data, tmp_path):
    lines = small_data["sft"].read_text(encoding="utf-8").splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:200]) + '{"conversations": [{"role": "robot", "content": "hi"}]}\n'
                   + "".join(lines[200:]), encoding="utf-8")
    result = subprocess.run(trainer_command("train_full_sft.py", tiny_flags(tmp_path, bad, "--from_weight", "none")),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert f"{bad}:201:" in result.stderr and "robot" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_every_trainer_help_shows_its_usage_lines_as_written():
    """`--help` on each stage prints its docstring's usage block line by line (not re-wrapped) and its flags."""
    scripts = sorted(path.name for path in (Path(__file__).resolve().parents[1] / "trainer").glob("train_*.py"))
    assert len(scripts) == 10
    code = ("import contextlib, io, runpy, sys\n"
            "for script in sys.argv[1:]:\n"
            "    sys.argv = [script, '--help']\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    print('=====', script); print(out.getvalue())\n")
    trainer_dir = Path(__file__).resolve().parents[1] / "trainer"
    result = subprocess.run([sys.executable, "-c", code, *[str(trainer_dir / s) for s in scripts]],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = dict(zip(scripts, result.stdout.split("===== ")[1:]))
    for script in scripts:
        first_usage = next(line for line in (trainer_dir / script).read_text().splitlines() if line.startswith("    python "))
        assert first_usage in outputs[script].splitlines(), script
        assert "--from_resume" in outputs[script] or script == "train_tokenizer.py"


def test_rerunning_a_finished_run_adds_nothing_and_more_epochs_continue(small_data, tmp_path):
    """`--from_resume 1` on a finished run says it is complete and exits 0 without a step; asked
    for a second epoch, it trains on from the saved step."""
    data = tmp_path / "forty.jsonl"
    data.write_text("".join(small_data["pretrain"].read_text(encoding="utf-8").splitlines(True)[:40]), encoding="utf-8")
    flags = tiny_flags(tmp_path, data, "--from_resume", "1")
    run_trainer("train_pretrain.py", flags)
    metrics = tmp_path / "out" / "pretrain_64.metrics.jsonl"
    finished = metrics.read_text()
    last_step = max(losses(metrics))
    assert last_step >= 3

    again = run_trainer("train_pretrain.py", flags)
    assert "the run is complete" in again.stdout + again.stderr
    assert metrics.read_text() == finished

    more = run_trainer("train_pretrain.py", flags + ["--epochs", "2"])
    assert f"training on from step {last_step}" in more.stdout + more.stderr
    steps = sorted(losses(metrics))
    assert steps[:last_step] == list(range(1, last_step + 1)) and max(steps) > last_step


def test_rerunning_with_a_higher_max_steps_continues_from_the_saved_step(small_data, tmp_path):
    flags = tiny_flags(tmp_path, small_data["pretrain"], "--from_resume", "1", "--max_steps")
    run_trainer("train_pretrain.py", flags + ["3"])
    metrics = tmp_path / "out" / "pretrain_64.metrics.jsonl"
    finished = metrics.read_text()
    again = run_trainer("train_pretrain.py", flags + ["3"])
    assert "the run is complete" in again.stdout + again.stderr and metrics.read_text() == finished
    more = run_trainer("train_pretrain.py", flags + ["5"])
    assert "training on from step 3" in more.stdout + more.stderr
    assert sorted(losses(metrics)) == [1, 2, 3, 4, 5]


def test_validation_is_logged_at_every_eval_interval_and_at_the_end(small_data, tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(small_data["sft"].read_text(encoding="utf-8").splitlines(True)[-20:]), encoding="utf-8")
    run_trainer("train_full_sft.py", tiny_flags(tmp_path, small_data["sft"], "--from_weight", "none", "--max_steps", "7",
                                                "--eval_data", str(held_out), "--eval_interval", "3",
                                                "--log_interval", "2"))
    records = {r["step"]: r for r in read_metrics(tmp_path / "out" / "full_sft_64.metrics.jsonl")}
    validated = sorted(step for step, r in records.items() if "val_loss" in r)
    assert validated == [3, 6, 7]
    assert sorted(records) == [2, 3, 4, 6, 7]
    for step in validated:
        assert 0 < records[step]["val_bpb"] and 0 < records[step]["val_loss"] < 10
    assert records[7]["val_loss"] < records[3]["val_loss"]


def test_compiled_training_logs_the_same_losses(small_data, tmp_path):
    """`--use_compile 1` (torch.compile, inductor on the CPU) trains the same function."""
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    run_trainer("train_pretrain.py", tiny_flags(plain, small_data["pretrain"], "--max_steps", "3"))
    run_trainer("train_pretrain.py", tiny_flags(compiled, small_data["pretrain"], "--max_steps", "3", "--use_compile", "1"))
    expected = losses(plain / "out" / "pretrain_64.metrics.jsonl")
    assert_same_losses(losses(compiled / "out" / "pretrain_64.metrics.jsonl"), expected, tolerance=1e-4)


def test_weights_carry_every_flag_the_commit_and_the_data(small_data, tmp_path):
    """The sidecar's "train_args" is enough to rerun the stage: the command, every parsed flag, the
    commit and the data file with its line count; eval_llm shows it on load."""
    from model.weights import read_weights

    flags = tiny_flags(tmp_path, small_data["pretrain"], "--max_steps", "2", "--learning_rate", "3e-4")
    run_trainer("train_pretrain.py", flags)
    weights = tmp_path / "out" / "pretrain_64.pth"
    _, config, extra = read_weights(weights)
    record = extra["train_args"]
    assert config.hidden_size == 64 and "train_args" not in config.to_dict()
    assert record["script"] == "train_pretrain.py" and record["command"].split()[1:] == flags
    assert record["flags"]["learning_rate"] == 3e-4 and record["flags"]["max_steps"] == 2
    assert record["flags"]["warmup_steps"] == 0  # defaults too, not only what was typed
    assert record["data"] == {"path": str(small_data["pretrain"]), "lines": 300}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], capture_output=True,
                            text=True).stdout.strip()
    assert record["commit"].removesuffix("-dirty") == commit

    shown = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "eval_llm.py"), "--load_from", str(weights),
                            "--prompts", "你好", "--max_new_tokens", "2", "--device", "cpu"],
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "trained by: train_pretrain.py" in shown.stderr and commit[:7] in shown.stderr


def test_sft_history_mode_trains_one_example_per_reply_and_is_recorded(small_data, tmp_path):
    """`--history_mode query_utterance`: the 300 demo conversations become one example per reply, and the
    flags reach the sidecar's train_args like every other."""
    from dataset.lm_dataset import SFTDataset
    from model.loader import load_tokenizer
    from model.weights import read_weights

    flags = tiny_flags(tmp_path, small_data["sft"], "--from_weight", "none", "--max_steps", "1",
                       "--history_mode", "query_utterance", "--history_utterances", "3")
    printed = run_trainer("train_full_sft.py", flags).stdout
    replies = sum(m["role"] == "assistant" for line in small_data["sft"].read_text(encoding="utf-8").splitlines()
                  for m in json.loads(line)["conversations"])
    assert replies > 300 and f"(300 lines, {replies} examples)" in printed
    assert len(SFTDataset(small_data["sft"], load_tokenizer(), history_mode="query_utterance")) == replies
    record = read_weights(tmp_path / "out" / "full_sft_64.pth")[2]["train_args"]
    assert record["flags"]["history_mode"] == "query_utterance" and record["flags"]["history_utterances"] == 3


class NumberedDocuments(torch.utils.data.Dataset):
    """Document i is the token i + 10, repeated 1 + i % 7 times: any batch tells which documents it holds."""
    pad_token_id = 0

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        tokens = torch.full((1 + i % 7,), i + 10)
        return {"input_ids": tokens, "labels": tokens.clone()}


def documents_in(batch: dict) -> list[int]:
    """The documents of a packed or padded batch, each once per time it was packed."""
    found = []
    for row, documents in zip(batch["input_ids"], batch["attention_mask"]):
        if documents.max() > 1:  # packed: attention_mask numbers the documents of the row
            found += [int(row[documents == d][0]) - 10 for d in documents.unique().tolist() if d > 0]
        else:
            found += [int(row[0]) - 10]
    return found


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("saved_world_size, world_size", [(2, 1), (1, 2), (2, 3)])
def test_data_continues_on_another_process_count_training_each_document_once(pack, saved_world_size, world_size):
    """Ranks of one process count train a few batches each; the ranks of another count take over
    from all their saved states and finish the epoch. Over the epoch, read from the batches
    themselves, each document is trained exactly once, and at most world_size - 1 (the cut to equal
    shares) are not trained at all."""
    from dataset.lm_dataset import PackedBatches

    dataset = NumberedDocuments(61)
    trained, states = [], []
    for rank in range(saved_world_size):
        batches = PackedBatches(dataset, 3, 16, pack=pack, seed=7, rank=rank, world_size=saved_world_size, buffer_size=8)
        iterator = iter(batches)
        for _ in range(2 + rank):  # ranks stop at different places, as packed ranks do
            trained += documents_in(next(iterator))
        states.append(batches.state_dict())
    for rank in range(world_size):
        batches = PackedBatches(dataset, 3, 16, pack=pack, seed=7, rank=rank, world_size=world_size, buffer_size=8)
        batches.load_rank_states(states)
        for batch in batches:
            trained += documents_in(batch)
    assert len(trained) == len(set(trained)), "a document was trained twice"
    assert len(dataset) - world_size < len(set(trained)) <= len(dataset)


def test_a_run_resumes_on_another_number_of_processes(small_data, tmp_path):
    """Killed on 2 processes, resumed on 1, and then on 2 again: the saved step is mapped to the new
    count's steps, and, checked from the saved data positions, no document of the epoch is trained
    by two of the runs."""
    from dataset.lm_dataset import PackedBatches

    flags = tiny_flags(tmp_path, small_data["pretrain"], "--save_interval", "1", "--from_resume", "1")
    checkpoints = tmp_path / "ckpt"
    torchrun("train_pretrain.py", flags + ["--max_steps", "3"])
    on_two = [torch.load(checkpoints / name, weights_only=False)["objects"]["data"]
              for name in ("pretrain_64_resume.pth", "pretrain_64_resume_rank1.pth")]
    on_one = run_trainer("train_pretrain.py", flags + ["--max_steps", "8"])
    assert "its step 3 is step 6 here" in on_one.stdout
    one = torch.load(checkpoints / "pretrain_64_resume.pth", weights_only=False)
    assert one["world_size"] == 1 and one["step"] == 8
    again_on_two = torchrun("train_pretrain.py", flags + ["--max_steps", "6"])
    assert "its step 8 is step 4 here" in again_on_two.stdout
    metrics = tmp_path / "out" / "pretrain_64.metrics.jsonl"
    # steps 1-3 on two processes, 7-8 on one, then two again from step 4: what one process logged past
    # it is dropped, as after any resume, and the metrics count the steps of the last process count
    assert sorted(losses(metrics)) == [1, 2, 3, 5, 6]

    reader = PackedBatches(list(range(300)), 4, 64, seed=42)
    segments = [set().union(*(reader.trained_items(state) for state in on_two)),
                reader.trained_items(one["objects"]["data"]),
                set().union(*(reader.trained_items(torch.load(checkpoints / name, weights_only=False)["objects"]["data"])
                              for name in ("pretrain_64_resume.pth", "pretrain_64_resume_rank1.pth")))]
    assert all(segments)
    assert not (segments[0] & segments[1] or segments[0] & segments[2] or segments[1] & segments[2])
