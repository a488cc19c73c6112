"""Turn a training run into a pretrained model folder that SpeechBrain's interfaces load.

Usage::

    python -m umamba.export RUN_DIR MODEL_DIR [--ckpt best|last|PATH] [--overwrite]

``RUN_DIR`` is a training run's ``output_folder``: its ``hyperparams.yaml`` (the yaml as trained,
overrides applied) and the checkpoints in ``save/CKPT+*``. ``MODEL_DIR`` receives:

- ``hyperparams.yaml``: only what inference needs: ``sample_rate``, ``num_spks``, the
  ``Encoder``/``MaskNet``/``Decoder`` definitions with their resolved hyperparameters,
  ``modules`` (``encoder``, ``masknet``, ``decoder``, the names SpeechBrain's
  ``SepformerSeparation`` expects) and a ``pretrainer`` whose loadables are those modules;
- ``encoder.ckpt``, ``masknet.ckpt``, ``decoder.ckpt``: the parameters of the chosen checkpoint;
- ``README.md``: a model card (model, parameters, training configuration, test metrics, data).

The ``pretrainer`` gives no ``paths``: the files are then fetched from the ``source`` passed to
``from_hparams``, so the folder can be moved or copied anywhere and still loads. Load it with
:class:`umamba.inference.UMambaSeparation` (chunked long files, any sample rate) or
``speechbrain.inference.separation.SepformerSeparation``.

The best checkpoint (lowest validation ``neg_si_snr``) is exported by default. Before the folder
appears, the yaml is loaded and each parameter file is loaded into its module with strict key
matching, so a folder that exists is a folder that loads; it is built in a temporary folder and
renamed into place.

Authors
 * U-Mamba-Net contributors
"""

import argparse
import csv
import io
import os
import pathlib
import shutil
import sys
import tempfile
import uuid

import yaml
from hyperpyyaml import load_hyperpyyaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.tag import Tag
from speechbrain.utils.checkpoints import CKPT_PREFIX, METAFNAME, Checkpoint, Checkpointer, torch_recovery

from umamba.checkpoints import checkpoint_problem

CHECKPOINT_KEY = "neg_si_snr"
"""Checkpoint meta key of the validation loss (negative SI-SNR in dB): lower is better."""

MODULES = {"encoder": "Encoder", "masknet": "MaskNet", "decoder": "Decoder"}
"""Module names SpeechBrain's separation interface expects -> their definition keys in the yaml."""

HPARAMS_FILE = "hyperparams.yaml"

# Training settings shown in the model card, when the run's yaml has them.
_TRAINING_KEYS = (
    "seed", "batch_size", "segment_seconds", "lr", "weight_decay", "max_grad_norm",
    "threshold_byloss", "threshold", "loss_upper_lim",
)


class ExportError(ValueError):
    """A run folder cannot be exported; the message names the file or folder at fault."""


def find_checkpoint(run_dir: str, ckpt: str = "best") -> Checkpoint:
    """Finds the checkpoint of a training run to export.

    Arguments
    ---------
    run_dir : str
        The run's output folder (checkpoints in ``<run_dir>/save/CKPT+*``).
    ckpt : str
        ``"best"`` (lowest validation ``neg_si_snr`` in ``CKPT.yaml``), ``"last"`` (most
        recent) or the path of a checkpoint folder.

    Returns
    -------
    speechbrain.utils.checkpoints.Checkpoint
        The checkpoint: ``path``, ``meta`` (from ``CKPT.yaml``) and ``paramfiles``.

    Raises
    ------
    ExportError
        If there is no such checkpoint, or it lacks a module's parameter file.

    Example
    -------
    >>> run = getfixture("tmp_path")
    >>> import torch
    >>> saver = Checkpointer(run / "save", {name: torch.nn.Linear(1, 1) for name in MODULES})
    >>> _ = saver.save_checkpoint(meta={"neg_si_snr": -3.0}, name="good")
    >>> _ = saver.save_checkpoint(meta={"neg_si_snr": 5.0}, name="later")
    >>> find_checkpoint(str(run), "best").path.name, find_checkpoint(str(run), "last").path.name
    ('CKPT+good', 'CKPT+later')
    """
    if ckpt in ("best", "last"):
        save_dir = os.path.join(run_dir, "save")
        if not os.path.isdir(save_dir):
            raise ExportError(f"Cannot export '{run_dir}': it has no checkpoint folder '{save_dir}'")
        checkpointer = Checkpointer(save_dir)
        if not checkpointer.list_checkpoints():
            raise ExportError(f"Cannot export '{run_dir}': no checkpoint ({CKPT_PREFIX}+*) in '{save_dir}'")

        def complete(checkpoint):  # not left half-written by a run killed while saving
            return checkpoint_problem(checkpoint.path, MODULES) is None

        if ckpt == "best":
            found = checkpointer.find_checkpoint(min_key=CHECKPOINT_KEY, ckpt_predicate=complete)
            if found is None:
                raise ExportError(
                    f"Cannot export '{run_dir}': no checkpoint in '{save_dir}' records a validation "
                    f"{CHECKPOINT_KEY} (pass --ckpt last or a checkpoint folder)"
                )
        else:
            found = checkpointer.find_checkpoint(ckpt_predicate=complete)
            if found is None:
                raise ExportError(f"Cannot export '{run_dir}': every checkpoint in '{save_dir}' is incomplete")
    else:
        meta_file = os.path.join(ckpt, METAFNAME)
        if not os.path.isfile(meta_file):
            raise ExportError(f"Cannot export checkpoint '{ckpt}': not a checkpoint folder (no {METAFNAME})")
        with open(meta_file, encoding="utf-8") as f:
            meta = yaml.safe_load(f) or {}
        path = pathlib.Path(ckpt)
        found = Checkpoint(path, meta, {file.stem: file for file in path.glob("*.ckpt")})
    missing = [name for name in MODULES if name not in found.paramfiles]
    if missing:
        raise ExportError(
            f"Cannot export checkpoint '{found.path}': no parameter file for {', '.join(missing)} "
            f"(expected {', '.join(f'{m}.ckpt' for m in missing)})"
        )
    return found


def _clean_copy(node, memo: dict):
    """Copy of a ruamel node tree keeping tags and shared nodes, without comments or anchor names."""
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, dict):
        copy = CommentedMap()
        memo[id(node)] = copy
        copy.update((key, _clean_copy(value, memo)) for key, value in node.items())
    elif isinstance(node, list):
        copy = CommentedSeq()
        memo[id(node)] = copy
        copy.extend(_clean_copy(value, memo) for value in node)
    elif isinstance(node, TaggedScalar):
        return TaggedScalar(node.value, tag=node.tag.value)
    else:
        return node
    if node.tag.value is not None:
        copy.yaml_set_ctag(node.tag)
    return copy


def _read_run_hparams(run_dir: str):
    """The run's ``hyperparams.yaml`` as ruamel nodes (tags kept, references already resolved)."""
    path = os.path.join(run_dir, HPARAMS_FILE)
    if not os.path.isfile(path):
        raise ExportError(f"Cannot export '{run_dir}': no {HPARAMS_FILE} (is it a training output_folder?)")
    try:
        with open(path, encoding="utf-8") as f:
            doc = YAML().load(f)
    except Exception as err:  # ruamel raises many types; all mean "not a readable yaml"
        raise ExportError(f"Cannot export '{run_dir}': {path} is not valid YAML ({err})") from err
    modules = doc.get("modules") if isinstance(doc, dict) else None
    missing = [k for k in ("sample_rate", "num_spks") if not isinstance(doc, dict) or k not in doc]
    missing += [f"modules.{m}" for m in MODULES if not isinstance(modules, dict) or m not in modules]
    if missing:
        raise ExportError(f"Cannot export '{run_dir}': {path} has no {', '.join(missing)}")
    return doc


def _module_refs() -> CommentedMap:
    return CommentedMap((name, TaggedScalar(f"<{key}>", tag="!ref")) for name, key in MODULES.items())


def inference_hparams(run_dir: str, header: str = "") -> str:
    """The inference ``hyperparams.yaml`` text of a training run.

    Arguments
    ---------
    run_dir : str
        The run's output folder, holding ``hyperparams.yaml``.
    header : str
        Comment lines put at the top (each starting with ``#``).

    Returns
    -------
    str
        YAML with ``sample_rate``, ``num_spks``, ``Encoder``, ``MaskNet``, ``Decoder``,
        ``modules`` and ``pretrainer``.

    Example
    -------
    >>> run = getfixture("tmp_path")
    >>> _ = (run / "hyperparams.yaml").write_text(
    ...     "sample_rate: 8000\\nnum_spks: 2\\nlr: 0.1\\n"
    ...     "Encoder: &e !new:torch.nn.Identity\\nMaskNet: &m !new:torch.nn.Identity\\n"
    ...     "Decoder: &d !new:torch.nn.Identity\\nmodules: {encoder: *e, masknet: *m, decoder: *d}\\n")
    >>> text = inference_hparams(str(run))
    >>> "lr" in text, "masknet: !ref <MaskNet>" in text
    (False, True)
    """
    doc = _read_run_hparams(run_dir)
    out = CommentedMap()
    out["sample_rate"] = doc["sample_rate"]
    out["num_spks"] = doc["num_spks"]
    memo = {}
    for name, key in MODULES.items():
        out[key] = _clean_copy(doc["modules"][name], memo)
    out["modules"] = _module_refs()
    out["pretrainer"] = CommentedMap(loadables=_module_refs())
    out["pretrainer"].yaml_set_ctag(Tag(suffix="!new:speechbrain.utils.parameter_transfer.Pretrainer"))
    for key in ("Encoder", "MaskNet", "Decoder", "modules", "pretrainer"):
        out.yaml_set_comment_before_after_key(key, before="\n")
    dumper = YAML()
    dumper.indent(mapping=4, sequence=4, offset=2)
    stream = io.StringIO()
    dumper.dump(out, stream)
    return header + stream.getvalue()


def _load_modules(model_dir: str) -> dict:
    """Builds the modules of an exported folder and loads their parameters with strict key matching."""
    hparams_file = os.path.join(model_dir, HPARAMS_FILE)
    with open(hparams_file, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f)
    for name, module in hparams["modules"].items():
        paramfile = os.path.join(model_dir, f"{name}.ckpt")
        try:
            torch_recovery(module, paramfile, end_of_epoch=False)
        except RuntimeError as err:
            first_line = str(err).splitlines()[0]
            raise ExportError(
                f"Cannot export: the parameters in {paramfile} do not fit the {name} that {hparams_file} "
                f"defines ({first_line})"
            ) from err
    return hparams


def _read_summary(run_dir: str) -> list:
    path = os.path.join(run_dir, "test_results", "summary.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _epoch(checkpoint: Checkpoint):
    """Epochs done at the checkpoint, from SpeechBrain's epoch counter file (a number or a yaml dict)."""
    counter = checkpoint.paramfiles.get("counter")
    if counter is None:
        return None
    with open(counter, encoding="utf-8") as f:
        value = yaml.safe_load(f)
    return value.get("current_epoch") if isinstance(value, dict) else value


def _model_card(run_dir: str, checkpoint: Checkpoint, hparams: dict, choice: str) -> str:
    """The ``README.md`` of an exported model: what it is, how it was trained, how it scored."""
    doc = _read_run_hparams(run_dir)
    modules = hparams["modules"]
    sample_rate, num_spks = hparams["sample_rate"], hparams["num_spks"]
    masknet = type(modules["masknet"])
    synthetic = not doc.get("data_folder")
    lines = [
        f"# {masknet.__name__} speech separation model",
        "",
        f"Separates a single-channel mixture of {num_spks} talkers, sampled at {sample_rate} Hz, into "
        f"{num_spks} signals. Exported with `python -m umamba.export` from the training run "
        f"`{os.path.basename(os.path.abspath(run_dir))}` of the U-Mamba-Net project.",
        "",
    ]
    if synthetic:
        lines += [
            "**Trained on the built-in SYNTHETIC demo corpus** (pseudo-speech mixtures in the Libri2Mix "
            "layout), not on Libri2Mix: this model only shows the recipe working end to end. It will not "
            "separate real speech well, and its scores are not comparable with published results.",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from umamba.inference import UMambaSeparation",
        "",
        'model = UMambaSeparation.from_hparams(source="path/to/this/folder")',
        'estimates = model.separate_file("mixture.wav", out_dir="separated")  # [time, n_src]',
        "```",
        "",
        "or `umamba-separate mixture.wav --model path/to/this/folder --out separated`. Long files are "
        "separated in overlapping chunks; other sample rates are resampled. The folder also loads with "
        "`speechbrain.inference.separation.SepformerSeparation.from_hparams`.",
        "",
        "## Model",
        "",
        "| module | class | parameters |",
        "|---|---|---|",
    ]
    total = 0
    for name, module in modules.items():
        count = sum(p.numel() for p in module.parameters())
        total += count
        lines.append(f"| {name} | `{type(module).__module__}.{type(module).__name__}` | {count:,} |")
    lines += [f"| total | | {total:,} |", "", "The full definitions are in `hyperparams.yaml`.", ""]

    criterion = {"best": f"lowest validation {CHECKPOINT_KEY}", "last": "most recent"}.get(choice, "given")
    lines += ["## Checkpoint", "", f"- `{checkpoint.path.name}` ({criterion})"]
    epoch = _epoch(checkpoint)
    if epoch is not None:
        lines.append(f"- epochs trained: {epoch}")
    if CHECKPOINT_KEY in checkpoint.meta:
        lines.append(f"- validation SI-SNR: {-float(checkpoint.meta[CHECKPOINT_KEY]):.2f} dB")
    lines.append("")

    lines += ["## Training data", "", *_data_description(doc, sample_rate, num_spks, synthetic)]
    lines += ["", "## Training configuration", "", "| setting | value |", "|---|---|"]
    epochs_key = "demo_N_epochs" if synthetic else "N_epochs"  # the demo run replaces N_epochs
    lines += [f"| {key} | {doc[key]} |" for key in (epochs_key, *_TRAINING_KEYS) if key in doc]
    lines += ["", "Loss: utterance-level permutation-invariant negative SI-SNR.", "", "## Test results", ""]
    summary = _read_summary(run_dir)
    if summary:
        columns = list(summary[0])
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in summary]
        lines += ["", "From the run's `test_results/summary.csv` (SI-SNR, SDR, SIR, SAR in dB; *i*: improvement "
                  "over the mixture), computed by `train.py` with the run's best checkpoint (lowest validation "
                  f"{CHECKPOINT_KEY})" + ("." if choice == "best" else ", which may not be the one exported here.")]
        if synthetic:
            lines.append("These are scores on the synthetic demo test set, not Libri2Mix scores.")
    else:
        lines.append("No test results: the run has no `test_results/summary.csv`.")
    return "\n".join(lines) + "\n"


def _data_description(doc, sample_rate: int, num_spks: int, synthetic: bool) -> list:
    """Model card lines on the training data: corpus, condition (noise, reverberation), augmentation."""
    condition = str(doc.get("mixture_type"))
    if doc.get("reverb"):
        condition += f" with simulated reverberation, {doc.get('reverb_targets', 'anechoic')} targets"
    if synthetic:
        demo = ", ".join(f"{k} {doc[k]}" for k in ("demo_n_train", "demo_n_valid", "demo_n_test", "demo_seconds",
                                                    "demo_voices") if k in doc)
        lines = [f"SYNTHETIC demo corpus in the Libri{num_spks}Mix layout ({demo}); condition: {condition}."]
    else:
        lines = [
            f"Libri{num_spks}Mix wav{int(sample_rate) // 1000}k/{doc.get('librimix_mode')}, {condition}: training on "
            f"{doc.get('train_split')}, validation on {doc.get('valid_split')}, test on {doc.get('test_split')}."
        ]
    augmentation = [name for key, name in (("on_the_fly_reverb", "reverberation on the fly"),
                                           ("dynamic_mixing", "dynamic mixing")) if doc.get(key)]
    if doc.get("speed_perturb"):
        augmentation.append(f"speed perturbation {list(doc['speed_perturb'])} %")
    if augmentation:
        lines += ["", f"Training augmentation: {', '.join(augmentation)}."]
    return lines


def export_model(run_dir: str, model_dir: str, ckpt: str = "best", overwrite: bool = False) -> Checkpoint:
    """Writes the pretrained model folder of a training run (see the module documentation).

    Arguments
    ---------
    run_dir : str
        The training run's output folder.
    model_dir : str
        The folder to create.
    ckpt : str
        ``"best"``, ``"last"`` or the path of a checkpoint folder (see :func:`find_checkpoint`).
    overwrite : bool
        Replace ``model_dir`` if it exists and is not empty (otherwise an error).

    Returns
    -------
    speechbrain.utils.checkpoints.Checkpoint
        The checkpoint that was exported.

    Raises
    ------
    ExportError
        If the run has no such checkpoint or yaml, its parameters do not fit its modules, or
        ``model_dir`` exists (without ``overwrite``).
    """
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ExportError(f"Cannot export to '{model_dir}': it exists and is not a folder")
    if os.path.isdir(model_dir) and os.listdir(model_dir) and not overwrite:
        raise ExportError(f"Cannot export to '{model_dir}': the folder exists and is not empty (use --overwrite)")
    checkpoint = find_checkpoint(run_dir, ckpt)
    header = (
        f"# {HPARAMS_FILE} for inference, written by `python -m umamba.export` from checkpoint\n"
        f"# {checkpoint.path.name} of a training run (see README.md). Load this folder with\n"
        "# umamba.inference.UMambaSeparation or speechbrain.inference.separation.SepformerSeparation.\n\n"
    )
    text = inference_hparams(run_dir, header)
    parent = os.path.dirname(os.path.abspath(model_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(model_dir))}.", dir=parent)
    try:
        with open(os.path.join(tmp_dir, HPARAMS_FILE), "w", encoding="utf-8") as f:
            f.write(text)
        for name in MODULES:
            shutil.copyfile(checkpoint.paramfiles[name], os.path.join(tmp_dir, f"{name}.ckpt"))
        hparams = _load_modules(tmp_dir)
        with open(os.path.join(tmp_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(_model_card(run_dir, checkpoint, hparams, ckpt))
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private to the user
        _replace_dir(tmp_dir, model_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return checkpoint


def _replace_dir(new_dir: str, target: str) -> None:
    """Moves ``new_dir`` to ``target``; an existing ``target`` is swapped out first, then deleted."""
    if not os.path.isdir(target):
        os.replace(new_dir, target)
        return
    old = f"{os.path.abspath(target)}.old-{uuid.uuid4().hex}"
    os.replace(target, old)
    try:
        os.replace(new_dir, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old)


def main(argv=None) -> int:
    """``python -m umamba.export RUN_DIR MODEL_DIR [--ckpt best|last|PATH] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m umamba.export",
        description="Export a training run's checkpoint as a pretrained model folder (hyperparams.yaml, "
                    "encoder/masknet/decoder.ckpt, README.md) for SpeechBrain's from_hparams.",
    )
    parser.add_argument("run_dir", help="training output_folder (hyperparams.yaml and save/CKPT+*)")
    parser.add_argument("model_dir", help="folder to create")
    parser.add_argument("--ckpt", default="best",
                        help="best (lowest validation neg_si_snr, default), last, or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="replace MODEL_DIR if it exists")
    args = parser.parse_args(argv)
    try:
        checkpoint = export_model(args.run_dir, args.model_dir, args.ckpt, args.overwrite)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Exported {checkpoint.path} to {args.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
