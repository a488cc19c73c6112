"""train.py under DDP: 2 CPU processes (gloo) with dynamic mixing, started by torch.distributed.run."""

import csv
import glob
import os
import signal
import socket
import subprocess
import sys

import torch
import yaml

from helpers import REPO, TINY_UMAMBA, as_cli

TINY_MODEL = as_cli(TINY_UMAMBA)
MIXTURES_PER_EPOCH = 8

# Runs train.py on one DDP process and records what it did: the dynamic-mixing items it drew (epoch,
# index, ID) and its final parameters. Rank 1 also gets a NaN loss on its first batch, which every
# process must then skip together (a process alone skipping its backward pass hangs the others).
RECORDING_RUN = """
import os, runpy, sys
import speechbrain as sb
import torch
from umamba.brain import Separation
from umamba.data.dynamic_mixing import DynamicMixingDataset

record_dir = sys.argv[1]
rank = int(os.environ["RANK"])
items = open(os.path.join(record_dir, f"items_rank{rank}.txt"), "w")
get_item = DynamicMixingDataset.__getitem__

def recording_get_item(self, index):
    item = get_item(self, index)
    items.write(f"{self.epoch} {index} {item['id']}\\n")
    items.flush()
    return item

objectives = Separation.compute_objectives

def nan_on_rank_1_first_batch(self, predictions, batch, stage):
    loss = objectives(self, predictions, batch, stage)
    if rank == 1 and stage == sb.Stage.TRAIN and self.hparams.epoch_counter.current == 1 and self.step == 1:
        loss = loss * float("nan")
    return loss

DynamicMixingDataset.__getitem__ = recording_get_item
Separation.compute_objectives = nan_on_rank_1_first_batch
sys.argv = sys.argv[2:]
separator = runpy.run_path(sys.argv[0], run_name="__main__")["separator"]
torch.save({name: getattr(module, "module", module).state_dict() for name, module in separator.modules.items()},
           os.path.join(record_dir, f"params_rank{rank}.pt"))
"""


def _read(path):
    with open(path) as f:
        return f.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_data_write_one_checkpoint_set_and_one_report(tmp_path):
    out, records = tmp_path / "out", tmp_path / "records"
    records.mkdir()
    wrapper = tmp_path / "recording_run.py"
    wrapper.write_text(RECORDING_RUN)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
        str(wrapper), str(records), "train.py", "hparams/umamba.yaml", "--distributed_backend", "gloo",
        "--output_folder", str(out), "--device", "cpu", *TINY_MODEL,
        "--demo_folder", str(tmp_path / "demo"), "--demo_n_train", "4", "--demo_n_valid", "2", "--demo_n_test", "2",
        "--demo_seconds", "1.0", "--demo_voices", "synthetic", "--demo_rir_rooms", "4", "--batch_size", "2",
        "--segment_seconds", "0.5", "--n_audio_to_save", "1", "--demo_N_epochs", "2",
        "--compute_pesq", "False", "--compute_stoi", "False",
        "--dynamic_mixing", "True", "--dm_mixtures_per_epoch", str(MIXTURES_PER_EPOCH),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:  # a hang: end the launcher and both workers
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError("DDP training hung:\n" + output[-5000:]) from None
    assert proc.returncode == 0, output[-5000:]

    # The DistributedSampler split each epoch's new mixtures between the two processes.
    drawn = {}
    for rank in (0, 1):
        with open(records / f"items_rank{rank}.txt") as f:
            for line in f:
                epoch, index, mixture_id = line.split()
                drawn.setdefault((int(epoch), rank), {})[int(index)] = mixture_id
    for epoch in (1, 2):
        first, second = set(drawn[epoch, 0]), set(drawn[epoch, 1])
        assert len(first) == len(second) == MIXTURES_PER_EPOCH // 2
        assert first | second == set(range(MIXTURES_PER_EPOCH))
    epoch_ids = [{**drawn[epoch, 0], **drawn[epoch, 1]} for epoch in (1, 2)]
    assert epoch_ids[0] != epoch_ids[1]  # dynamic mixing: other mixtures in epoch 2

    # One log, one line per epoch; the batch made NaN on rank 1 was skipped on rank 0 too.
    log = (out / "train_log.txt").read_text()
    assert log.count("epoch: 1,") == log.count("epoch: 2,") == log.count("test neg_si_snr") == 1, log
    assert "skipped_batches: 1 " in log.splitlines()[0]

    # One checkpoint set (written by rank 0 alone), holding the parameters both processes ended with.
    checkpoints = glob.glob(str(out / "save" / "CKPT*"))
    counters = [_read(os.path.join(c, "counter.ckpt")) for c in checkpoints]
    assert sorted(counters) == sorted(set(counters)) and not glob.glob(str(out / "save" / "incomplete-*"))
    metas = {c: yaml.safe_load(_read(os.path.join(c, "CKPT.yaml"))) for c in checkpoints}
    best = min((c for c in checkpoints if "neg_si_snr" in metas[c]), key=lambda c: metas[c]["neg_si_snr"])
    params = [torch.load(records / f"params_rank{rank}.pt") for rank in (0, 1)]
    for name in ("encoder", "masknet", "decoder"):
        saved = torch.load(os.path.join(best, f"{name}.ckpt"), map_location="cpu")
        for key, value in saved.items():
            assert torch.equal(params[0][name][key], value) and torch.equal(params[1][name][key], value), key

    # The test set was scored whole, once, by the main process.
    with open(out / "test_results" / "per_utterance.csv", newline="") as f:
        scored = [row["ID"] for row in csv.DictReader(f)]
    (test_csv,) = glob.glob(str(out / "save" / "test_*reverb*.csv"))
    with open(test_csv, newline="") as f:
        expected = [row["ID"] for row in csv.DictReader(f)]
    assert sorted(scored) == sorted(expected) and len(expected) == 2
