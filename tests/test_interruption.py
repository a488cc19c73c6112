"""train.py killed with SIGKILL, mid-epoch and while writing a checkpoint: the next run resumes from the
last complete checkpoint, and no epoch or optimizer step is repeated or lost."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import REPO, TINY_UMAMBA, as_cli

TINY_MODEL = as_cli(TINY_UMAMBA)
EPOCHS, STEPS_PER_EPOCH = 3, 4  # 8 training mixtures in batches of 2

# Runs train.py, but SIGKILLs the process half-way through writing masknet.ckpt of the second
# end-of-epoch checkpoint: exactly what a kill during SpeechBrain's (non-atomic) save leaves behind.
KILL_WHILE_SAVING = """
import io, os, runpy, signal, sys
import torch, yaml

end_of_epoch_saves = 0
save = torch.save

def save_and_die_half_way(obj, path, *args, **kwargs):
    global end_of_epoch_saves
    if os.path.basename(path) == "masknet.ckpt":
        with open(os.path.join(os.path.dirname(path), "CKPT.yaml")) as f:
            end_of_epoch_saves += yaml.safe_load(f)["end-of-epoch"]
        if end_of_epoch_saves == 2:
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            with open(path, "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    save(obj, path, *args, **kwargs)

torch.save = save_and_die_half_way
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train_args(tmp_path):
    return [
        "train.py", "hparams/umamba.yaml", "--output_folder", str(tmp_path / "out"), "--device", "cpu", *TINY_MODEL,
        "--demo_folder", str(tmp_path / "demo"), "--demo_n_train", "8", "--demo_n_valid", "2", "--demo_n_test", "2",
        "--demo_seconds", "1.0", "--demo_voices", "synthetic", "--reverb", "False", "--batch_size", "2",
        "--segment_seconds", "0.5", "--n_audio_to_save", "0", "--demo_N_epochs", str(EPOCHS),
        "--compute_pesq", "False", "--compute_stoi", "False",
        # a checkpoint after every step (SpeechBrain's intra-epoch checkpoints)
        "--ckpt_interval_minutes", "0", "--ckpt_interval_steps", "1",
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}


def resume(tmp_path):
    proc = subprocess.run([sys.executable, *train_args(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"the resumed run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def _meta(ckpt):
    with open(os.path.join(ckpt, "CKPT.yaml")) as f:
        return yaml.safe_load(f)


def _read(path):
    with open(path) as f:
        return f.read()


def check_finished_run(out, resumed_output):
    """Each epoch trained and logged once, the optimizer stepped once per batch, every checkpoint whole."""
    log = _read(out / "train_log.txt")
    for epoch in range(1, EPOCHS + 1):
        assert log.count(f"epoch: {epoch},") == 1, log
    assert log.count("test neg_si_snr") == 1
    assert "Going into epoch 1" not in resumed_output  # resumed, not restarted
    checkpoints = glob.glob(str(out / "save" / "CKPT*"))
    assert checkpoints
    for ckpt in checkpoints:  # every file loads: nothing corrupt was left behind or written
        for path in glob.glob(os.path.join(ckpt, "*.ckpt")):
            if os.path.basename(path) in ("counter.ckpt", "brain.ckpt", "dataloader-TRAIN.ckpt"):
                assert _read(path).strip()
            else:
                torch.load(path, map_location="cpu")
    last = max(checkpoints, key=lambda c: _meta(c)["unixtime"])
    assert _meta(last)["end-of-epoch"] and _read(os.path.join(last, "counter.ckpt")) == str(EPOCHS)
    optimizer = torch.load(os.path.join(last, "optimizer.ckpt"), map_location="cpu")
    assert max(int(s["step"]) for s in optimizer["state"].values()) == EPOCHS * STEPS_PER_EPOCH
    assert len(_read(out / "test_results" / "per_utterance.csv").splitlines()) == 1 + 2


def test_sigkill_mid_epoch_resumes_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *train_args(tmp_path)], cwd=REPO, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        try:
            # Kill as soon as a checkpoint inside epoch 2 exists; the run goes on meanwhile, so the kill
            # lands anywhere from that step to a later one (possibly in the middle of a save).
            while proc.poll() is None and time.monotonic() < deadline:
                if any(_read(c).strip() == "2" for c in glob.glob(str(out / "save" / "CKPT*" / "counter.ckpt"))):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed:\n" + _read(log_path)[-3000:]
    assert "epoch: 3," not in _read(out / "train_log.txt")

    output = resume(tmp_path)
    assert "Loading a checkpoint from" in output
    check_finished_run(out, output)


def test_sigkill_while_writing_a_checkpoint_sets_it_aside(tmp_path):
    out = tmp_path / "out"
    wrapper = tmp_path / "kill_while_saving.py"
    wrapper.write_text(KILL_WHILE_SAVING)
    killed = subprocess.run([sys.executable, str(wrapper), *train_args(tmp_path)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # What the kill left: the newest folder looks like the best end-of-epoch checkpoint, but its
    # masknet.ckpt is cut short and the files after it are missing.
    (broken,) = [c for c in glob.glob(str(out / "save" / "CKPT*")) if _meta(c)["end-of-epoch"]
                 and _meta(c)["unixtime"] == max(_meta(d)["unixtime"] for d in glob.glob(str(out / "save" / "CKPT*")))]
    assert "neg_si_snr" in _meta(broken) and not os.path.exists(os.path.join(broken, "optimizer.ckpt"))
    with pytest.raises((RuntimeError, OSError)):  # what SpeechBrain's recovery would fail on
        torch.load(os.path.join(broken, "masknet.ckpt"), map_location="cpu")
    assert "epoch: 2," not in _read(out / "train_log.txt")  # epoch 2 is logged only once its checkpoint is whole

    output = resume(tmp_path)
    set_aside = out / "save" / ("incomplete-" + os.path.basename(broken))
    assert set_aside.is_dir() and not os.path.exists(broken)
    assert f"Checkpoint {broken} is incomplete (masknet.ckpt is cut short)" in output
    # It resumed from the checkpoint after the last step of epoch 2, so epoch 2 has nothing left to train.
    assert "Going into epoch 2" in output
    check_finished_run(out, output)
