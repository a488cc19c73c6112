"""The bundled recipes (hparams/*.yaml): one recipe section for all, and each trains through train.py."""

import csv
import glob
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from umamba.compare import read_hparams_values
from helpers import REPO, TINY_UMAMBA, as_cli

MODELS = ("umamba", "sudormrf", "sepformer", "dprnn", "convtasnet")
RECIPE_MARKER = "# ################################ recipe ##################################"
SHARED_TOP_KEYS = ("seed", "__set_seed", "sample_rate", "num_spks")

# Recipe-section keys that a model's published configuration fixes differently from
# hparams/umamba.yaml; each yaml's header names them. Every other recipe key must be identical.
ALLOWED_RECIPE_DIFFERENCES = {
    "sudormrf": set(),
    "sepformer": {"lr", "batch_size"},  # SpeechBrain's sepformer-libri2mix.yaml: 0.00015, 1
    "dprnn": {"lr", "batch_size", "lr_scheduler.dont_halve_until_epoch"},  # SpeechBrain's WSJ0Mix dprnn.yaml: + 85
    "convtasnet": {"lr", "batch_size", "lr_scheduler.dont_halve_until_epoch"},  # WSJ0Mix convtasnet.yaml: the same
}

# The SpeechBrain recipe each yaml's model section comes from, named in its header.
SOURCES = {
    "sepformer": "recipes/LibriMix/separation/hparams/sepformer-libri2mix.yaml",
    "dprnn": "recipes/WSJ0Mix/separation/hparams/dprnn.yaml",
    "convtasnet": "recipes/WSJ0Mix/separation/hparams/convtasnet.yaml",
}


class _TaggedLoader(yaml.SafeLoader):
    """HyperPyYAML as plain data, keeping tags: ``!ref <seed>`` -> ``{"!ref": "<seed>"}``."""


def _tagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {"!" + suffix: value}


_TaggedLoader.add_multi_constructor("!", _tagged)


def differences(a, b, path=""):
    """Dotted paths of the values that differ between two parsed yaml values (tags must match)."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        found = set()
        for key in a:
            sub = path if str(key).startswith("!") else f"{path}.{key}".lstrip(".")
            found |= differences(a[key], b[key], sub)
        return found
    return set() if a == b else {path}


def sections(model):
    """(header comment, model section, recipe section) of ``hparams/<model>.yaml``, sections parsed."""
    with open(os.path.join(REPO, "hparams", f"{model}.yaml"), encoding="utf-8") as f:
        text = f.read()
    assert text.count(RECIPE_MARKER) == 1, f"{model}.yaml: the recipe marker line must appear once"
    top, recipe = text.split(RECIPE_MARKER)
    header = top[: top.index("\nseed:")]
    return header, yaml.load(top, _TaggedLoader), yaml.load(recipe, _TaggedLoader)


@pytest.mark.parametrize("model", sorted(ALLOWED_RECIPE_DIFFERENCES))
def test_recipe_section_is_umamba_yaml_apart_from_the_allow_list(model):
    _, _, reference = sections("umamba")
    header, _, recipe = sections(model)
    assert list(recipe) == list(reference), f"{model}.yaml: recipe keys differ from umamba.yaml's"
    differing = differences(recipe, reference)
    allowed = ALLOWED_RECIPE_DIFFERENCES[model]
    assert differing == allowed, f"{model}.yaml differs from umamba.yaml in {differing}; allowed: {allowed}"
    for key in allowed:  # each deviation is stated in the header
        assert key.split(".")[-1] in header, f"{model}.yaml: the header does not state its {key}"


@pytest.mark.parametrize("model", MODELS)
def test_shared_settings_output_folder_and_no_download(model):
    header, top, _ = sections(model)
    _, reference, _ = sections("umamba")
    for key in SHARED_TOP_KEYS:
        assert top[key] == reference[key], f"{model}.yaml: {key} differs from umamba.yaml"
    assert top["output_folder"] == {"!ref": f"results/{model}/<seed>"}
    for key in ("Encoder", "MaskNet", "Decoder"):
        assert key in top, f"{model}.yaml has no {key} in its model section"
    with open(os.path.join(REPO, "hparams", f"{model}.yaml"), encoding="utf-8") as f:
        settings = [line for line in f if not line.lstrip().startswith("#")]
    assert not [line for line in settings if "Pretrainer" in line]  # nothing fetched from a hub at start
    if model in SOURCES:
        assert SOURCES[model] in header, f"{model}.yaml: the header does not name its source {SOURCES[model]}"


def test_sudormrf_is_umamba_without_mamba():
    _, umamba, _ = sections("umamba")
    _, sudormrf, _ = sections("sudormrf")
    assert list(sudormrf) == list(umamba)
    assert differences(sudormrf, umamba) == {"output_folder", "use_mamba"}
    assert umamba["use_mamba"] is True and sudormrf["use_mamba"] is False


# ------------------------------------------------------------------ debug runs through train.py ----

TINY_MODELS = {
    "umamba": as_cli(TINY_UMAMBA),
    "sudormrf": as_cli(TINY_UMAMBA),
    "sepformer": ["--N_encoder_out", "16", "--out_channels", "16", "--num_dual_path_layers", "1",
                  "--transformer_layers", "1", "--nhead", "2", "--d_ffn", "32", "--K", "20"],
    "dprnn": ["--N_encoder_out", "16", "--out_channels", "16", "--num_dual_path_layers", "1", "--K", "20"],
    "convtasnet": ["--N_encoder_out", "16", "--B", "16", "--H", "32", "--X", "2", "--R", "1"],
}
MASKNETS = {
    "umamba": "!new:umamba.models.UMambaMaskNet",
    "sudormrf": "!new:umamba.models.UMambaMaskNet",
    "sepformer": "!new:speechbrain.lobes.models.dual_path.Dual_Path_Model",
    "dprnn": "!new:speechbrain.lobes.models.dual_path.Dual_Path_Model",
    "convtasnet": "!new:speechbrain.lobes.models.conv_tasnet.MaskNet",
}
LEARNING_RATES = {"umamba": 1e-3, "sudormrf": 1e-3, "sepformer": 1.5e-4, "dprnn": 1.5e-4, "convtasnet": 1.5e-4}


def _train(model, tmp):
    cmd = [sys.executable, "train.py", f"hparams/{model}.yaml", "--output_folder", str(tmp / model),
           "--device", "cpu", "--debug", "--debug_persistently", *TINY_MODELS[model],
           "--demo_folder", str(tmp / "demo"), "--demo_n_train", "4", "--demo_n_valid", "2", "--demo_n_test", "2",
           "--demo_seconds", "1.0", "--demo_voices", "synthetic", "--demo_rir_rooms", "4",
           "--batch_size", "2", "--segment_seconds", "0.5", "--n_audio_to_save", "0",
           "--compute_pesq", "False", "--compute_stoi", "False"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def debug_runs(tmp_path_factory):
    """A --debug run of every recipe with a tiny model: the first builds the demo corpus, then
    the others run two at a time (one thread each)."""
    tmp = tmp_path_factory.mktemp("baselines")
    procs = {MODELS[0]: _train(MODELS[0], tmp)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs.update(zip(MODELS[1:], pool.map(lambda m: _train(m, tmp), MODELS[1:])))
    return tmp, procs


@pytest.mark.parametrize("model", MODELS)
def test_every_recipe_trains_and_evaluates_a_debug_run(debug_runs, model):
    tmp, procs = debug_runs
    proc = procs[model]
    assert proc.returncode == 0, f"train.py {model}.yaml failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    out = tmp / model
    assert read_hparams_values(out / "hyperparams.yaml")["MaskNet"] == MASKNETS[model]
    log = (out / "train_log.txt").read_text()
    assert "epoch: 2," in log and "test neg_si_snr" in log, log
    assert f"lr: {LEARNING_RATES[model]:.2e}" in log  # the recipe's own learning rate was used
    assert glob.glob(str(out / "save" / "CKPT*" / "masknet.ckpt")), "no checkpoint written"
    with open(out / "test_results" / "summary.csv", newline="") as f:
        summary = {row["metric"]: row for row in csv.DictReader(f)}
    assert int(summary["si_snri"]["count"]) == 2 and math.isfinite(float(summary["si_snri"]["mean"]))
