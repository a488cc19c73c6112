"""The separation Brain: any Encoder/MaskNet/Decoder separator, trained with PIT SI-SNR.

One Brain serves U-Mamba-Net, SuDoRM-RF, SepFormer, DPRNN and Conv-TasNet: the yaml provides
``Encoder``, ``MaskNet`` and ``Decoder`` (as ``modules.encoder``, ``modules.masknet``,
``modules.decoder``) and the training settings documented in ``hparams/umamba.yaml``.
"""

import logging
import os
import time

import speechbrain as sb
import torch
from speechbrain.nnet.schedulers import ReduceLROnPlateau, update_learning_rate

from umamba.checkpoints import set_aside_incomplete_checkpoints
from umamba.data.datasets import source_keys
from umamba.evaluation import EvaluationReport, plot_separation, save_examples
from umamba.metrics import evaluate_utterance
from umamba.models.separator import separate

logger = logging.getLogger(__name__)


# What a training step does with its batch, from the least to the most severe (see fit_batch).
_STEP, _NOTHING_TO_LEARN, _SKIP = 0, 1, 2


class TooManySkippedBatches(RuntimeError):
    """Raised when too many training batches in a row had a non-finite or over-limit loss."""


class Separation(sb.Brain):
    """SpeechBrain Brain for mask-based separation with utterance-level PIT negative SI-SNR.

    Training skips a batch whose loss is non-finite or above ``loss_upper_lim`` (counted, with a
    warning) and stops after ``max_consecutive_skips`` such batches in a row. With
    ``threshold_byloss``, examples already better than ``threshold`` (negative SI-SNR in dB) are
    left out of the loss. At test time every utterance is scored (SI-SNR(i), SDR(i), SIR, SAR,
    PESQ, STOI) into ``<output_folder>/test_results/``, with wavs and spectrograms of the first
    ``n_audio_to_save`` utterances.
    """

    def on_fit_start(self):
        super().on_fit_start()  # builds the optimizer, then recovers the newest checkpoint
        self.skipped_batches = 0
        self.consecutive_skips = 0
        self.fit_start_time = time.monotonic()

    def init_optimizers(self):
        super().init_optimizers()
        # on_fit_start recovers the newest checkpoint next, now that every recoverable is registered
        # (the optimizer last): first set aside the ones a killed run left half-written.
        if self.checkpointer is not None:
            set_aside_incomplete_checkpoints(self.checkpointer)

    def on_evaluate_start(self, max_key=None, min_key=None):
        if self.checkpointer is not None:
            set_aside_incomplete_checkpoints(self.checkpointer)
        super().on_evaluate_start(max_key=max_key, min_key=min_key)  # loads the best checkpoint

    def compute_forward(self, batch, stage):
        """Returns (estimates [B, T, n_src], targets [B, T, n_src], mixture [B, T])."""
        batch = batch.to(self.device)
        mix, _ = batch.mix_sig
        targets = torch.stack([getattr(batch, f"{k}_sig").data for k in source_keys(self.hparams.num_spks)], dim=-1)
        augmentation = getattr(self.hparams, "augmentation", None)
        if stage == sb.Stage.TRAIN and augmentation is not None:
            with torch.no_grad():
                mix, targets = augmentation(mix, targets, batch)
        est = separate(self.modules.encoder, self.modules.masknet, self.modules.decoder, mix)
        return est, targets, mix

    def compute_objectives(self, predictions, batch, stage):
        """Per-example PIT negative SI-SNR in dB, shape [B]."""
        est, targets, _ = predictions
        return self.hparams.loss(targets, est)

    def fit_batch(self, batch):
        """One training step, skipping bad losses instead of stepping on them.

        Under DDP every process takes the same path: a process that skipped the backward pass
        while the others ran it would leave them waiting in the gradient all-reduce.
        """
        should_step = (self.step % self.grad_accumulation_factor) == 0
        with self.no_sync(not should_step):
            with self.training_ctx:
                predictions = self.compute_forward(batch, sb.Stage.TRAIN)
                example_losses = self.compute_objectives(predictions, batch, sb.Stage.TRAIN)
            finite = bool(torch.isfinite(example_losses).all())  # before the threshold, which drops NaN quietly
            loss = example_losses
            if getattr(self.hparams, "threshold_byloss", False):
                loss = loss[loss > self.hparams.threshold]  # examples already beyond the target teach nothing
            learn = loss.numel() > 0
            loss = loss.mean() if learn else loss.sum()  # the sum of nothing: 0
            bad = not finite or bool(loss > self.hparams.loss_upper_lim)
            verdict = self._most_severe_on_any_process(_SKIP if bad else _STEP if learn else _NOTHING_TO_LEARN)
            if verdict == _SKIP:
                return self._skip_batch(batch, example_losses)
            if verdict == _NOTHING_TO_LEARN:
                return torch.tensor(0.0)
            self.consecutive_skips = 0
            self.scaler.scale(loss / self.grad_accumulation_factor).backward()
        if should_step:
            self.optimizers_step()
        return loss.detach().cpu()

    def _most_severe_on_any_process(self, verdict: int) -> int:
        """The highest ``verdict`` over the DDP processes (``verdict`` itself without DDP)."""
        verdict = torch.tensor(verdict, device=self.device)
        return int(sb.utils.distributed.ddp_all_reduce(verdict, torch.distributed.ReduceOp.MAX))

    def _skip_batch(self, batch, example_losses):
        self.skipped_batches += 1
        self.consecutive_skips += 1
        for opt in self.optimizers_dict.values():
            opt.zero_grad(set_to_none=True)
        logger.warning(
            "Skipped training batch %s: losses %s (a loss was non-finite or their mean above loss_upper_lim=%s, "
            "here or on another DDP process); %d skipped so far, %d in a row",
            ",".join(batch.id), ", ".join(f"{value:.2f}" for value in example_losses.tolist()),
            self.hparams.loss_upper_lim, self.skipped_batches, self.consecutive_skips,
        )
        if self.consecutive_skips >= self.hparams.max_consecutive_skips:
            raise TooManySkippedBatches(
                f"{self.consecutive_skips} training batches in a row had a non-finite or over-limit loss "
                f"(last: {batch.id}); lower the learning rate or check the data"
            )
        return torch.tensor(0.0)

    def evaluate_batch(self, batch, stage):
        """Validation/test loss; at test time also every metric of every utterance in the batch."""
        with torch.no_grad():
            predictions = self.compute_forward(batch, stage)
            loss = self.compute_objectives(predictions, batch, stage)
        if stage == sb.Stage.TEST and self.test_report is not None:
            self._score_test_batch(batch, predictions)
        return loss.mean().detach().cpu()

    def _score_test_batch(self, batch, predictions):
        est, targets, mix = (t.detach().cpu() for t in predictions)
        lengths = batch.mix_sig.lengths.cpu()
        for i, utt_id in enumerate(batch.id):
            n = int(round(lengths[i].item() * mix.shape[1]))
            m, e, r = mix[i, :n], est[i, :n], targets[i, :n]
            self.test_report.add(
                utt_id,
                evaluate_utterance(
                    m, e, r, self.hparams.sample_rate,
                    compute_pesq=self.hparams.compute_pesq, compute_stoi=self.hparams.compute_stoi,
                ),
            )
            if self.saved_examples < self.hparams.n_audio_to_save:
                save_examples(m, e, r, self.hparams.sample_rate, self.examples_dir, utt_id)
                plot_separation(m, e, r, self.hparams.sample_rate, os.path.join(self.examples_dir, f"{utt_id}.png"),
                                title=utt_id)
                self.saved_examples += 1

    def _stop_when_over_budget(self, epoch):
        """Make this the last epoch once ``train_budget_minutes`` of this run have passed."""
        budget = getattr(self.hparams, "train_budget_minutes", 0)
        if not budget:
            return
        elapsed = torch.tensor((time.monotonic() - self.fit_start_time) / 60, device=self.device)  # NCCL: a GPU tensor
        elapsed = sb.utils.distributed.ddp_all_reduce(elapsed, torch.distributed.ReduceOp.MAX).item()  # stop together
        if elapsed >= budget:
            logger.info("Training budget of %g min used (%.1f min): stopping after epoch %d", budget, elapsed, epoch)
            self.hparams.epoch_counter.limit = epoch

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        if stage == sb.Stage.TRAIN:
            self.train_dataset = dataset  # dynamic mixing draws new mixtures each epoch
        return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)

    def on_stage_start(self, stage, epoch=None):
        if stage == sb.Stage.TRAIN and hasattr(getattr(self, "train_dataset", None), "set_epoch"):
            self.train_dataset.set_epoch(epoch)
        self.test_report = None
        if stage == sb.Stage.TEST and sb.utils.distributed.if_main_process():
            results_dir = self.hparams.test_results_folder
            self.examples_dir = os.path.join(results_dir, "examples")
            os.makedirs(self.examples_dir, exist_ok=True)
            self.test_report = EvaluationReport(results_dir)
            self.saved_examples = 0

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"neg_si_snr": stage_loss}  # the loss: negative SI-SNR in dB, lower is better
        if stage == sb.Stage.TRAIN:
            self.train_stats = {**stats, "skipped_batches": self.skipped_batches}
        elif stage == sb.Stage.VALID:
            current_lr = self.optimizer.param_groups[0]["lr"]
            if isinstance(self.hparams.lr_scheduler, ReduceLROnPlateau):
                current_lr, next_lr = self.hparams.lr_scheduler([self.optimizer], epoch, stage_loss)
                update_learning_rate(self.optimizer, next_lr)
            # Checkpoint, then log: a run killed while saving resumes from the previous checkpoint and
            # redoes this epoch, which must not be in the log yet.
            self.checkpointer.save_and_keep_only(meta={"neg_si_snr": stage_loss}, min_keys=["neg_si_snr"])
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": current_lr}, train_stats=self.train_stats, valid_stats=stats
            )
            self._stop_when_over_budget(epoch)
        elif stage == sb.Stage.TEST:
            if self.test_report is not None:  # the main process
                summary = self.test_report.close()
                stats.update({f"{k} mean": v["mean"] for k, v in summary.items()
                              if k in ("si_snri", "sdri", "pesq", "stoi")})
                logger.info("Per-utterance results: %s; summary: %s", self.test_report.per_utterance_path,
                            self.test_report.summary_path)
            # On every process: SpeechBrain's main-process-only functions end with a DDP broadcast.
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats
            )
