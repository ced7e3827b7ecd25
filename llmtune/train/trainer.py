"""The training loop: one explicit loop from the first batch to ``optimizer.step()``.

Read :meth:`Trainer.train` top to bottom. Per optimizer step it

1. takes the step's ``gradient_accumulation_steps`` micro-batches (the data order is a deterministic
   function of ``seed`` and the epoch, so a resumed run sees the same batches);
2. counts the step's items (loss tokens for pt/sft) over ALL micro-batches (and, distributed, all ranks);
3. runs each micro-batch forward under autocast and back-propagates ``loss_sum / step_items``, so
   accumulation gives exactly the gradient of one big batch (the 2024 gradient-accumulation bug is that
   each micro-batch was averaged on its own);
4. clips the gradient norm (``max_grad_norm``), steps AdamW and the LR schedule;
5. logs, evaluates and saves checkpoints on their schedules.

An online stage (ppo, grpo; :class:`~llmtune.train.stages.base.OnlineStage`) supplies its steps from
rollouts instead: step 1 becomes ``make_experience(trainer)`` whenever the queue of steps is empty, and a
step may hold several optimizer updates (a PPO iteration); everything else is the same loop.

Distributed training (DDP/FSDP2 under ``torchrun``, :mod:`llmtune.train.distributed`) touches only
``rank``, ``world_size``, ``all_reduce_sum`` and ``is_main`` here: each rank reads its own shard of the
shuffled order, item counts are summed over ranks, rank 0 logs. Wrapping and clipping are
:mod:`llmtune.train.wrap`'s; checkpoints go through one face, :mod:`llmtune.train.checkpointer`, which picks
the format (single process, FSDP2 sharded or trainable-only, per-rank online). The optimizer and schedule come
from :mod:`llmtune.train.optim`, the autocast dtype from :mod:`llmtune.train.precision`.

Sources: AdamW (Loshchilov & Hutter, 2019); schedules as in Hugging Face ``transformers.optimization``
(linear / cosine with linear warm-up, Loshchilov & Hutter 2017 for cosine); mixed precision with
``torch.autocast`` and ``GradScaler`` (Micikevicius et al., 2018).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from llmtune.data.collator import pad_collate
from llmtune.errors import LLMTuneError, Terminated, notice
from llmtune.models.memory import long_context_malloc
from llmtune.train import checkpoint as ckpt
from llmtune.train import checkpointer
from llmtune.train import wrap as dist_hooks
from llmtune.train.distributed import all_reduce_sum, is_main, rank, shard_indices, world_size
from llmtune.train import eval_report, guard
from llmtune.train import resume as resume_rules
from llmtune.train.interrupt import Interrupt
from llmtune.train.logging import TrainLogger, resolve_report_to
from llmtune.train.optim import build_optimizer, lr_lambda, num_warmup_steps
from llmtune.train.precision import resolve_precision
from llmtune.train.stages import StageContext, get_stage, item_counter, token_counter
from llmtune.train.stages.base import OnlineStage, OnlineStep


def as_train_config(config: Any) -> Any:
    """The run's :class:`llmtune.config.TrainConfig`: ``config`` itself, or a dict of keys built with
    ``parse_config(config, command="trainer")`` (the same defaults as ``llmtune.train``).

    Raises: :class:`LLMTuneError` for a bad key or value, or a ``config`` of another type.
    """
    from llmtune.config import TrainConfig, parse_config, validate

    if isinstance(config, TrainConfig):
        validate(config, "trainer")   # reads only: output_dir is set, values still allowed
        return config
    if isinstance(config, dict):
        return parse_config(config, command="trainer")
    raise LLMTuneError(f"Trainer config: got {type(config).__name__}; pass an llmtune.config.TrainConfig or a dict "
                       "of LLaMA-Factory keys")



class Trainer:
    """Runs one stage's training loop on a model.

    Args:
        model: an ``llmtune.models.Transformer`` (or any module a stage accepts) with its trainable
            parameters already chosen (LoRA / freeze / full).
        config: the run's ``llmtune.config.TrainConfig``, or a dict of LLaMA-Factory keys (built with
            :func:`as_train_config`: the same defaults as ``llmtune.train``).
        train_dataset: a sequence of rows (dicts of lists of ints, see docs/internals.md "Data").
        eval_dataset: optional sequence of rows for evaluation.
        collator: ``list[row] -> dict[str, Tensor]``; default :func:`pad_collate`.
        stage: a loss function; default the ``loss`` of ``STAGES[config.stage]`` (``llmtune.train.stages``).
        tokenizer: passed to stages in the context.
        ctx_extra: the stage context's ``extra`` dict (a reference model...).
        online: an online stage (:class:`~llmtune.train.stages.base.OnlineStage`): its ``loss`` and
            ``count_items`` replace the table's, its ``make_experience`` supplies the steps; ``train_dataset``
            is then its prompt rows (only their count is used here).

    ``train()`` writes ``output_dir/trainer_log.jsonl`` and checkpoints; raises :class:`LLMTuneError` on
    configuration mistakes. Not thread-safe; one Trainer per process.
    """

    def __init__(self, model: torch.nn.Module, config: Any, train_dataset: Sequence[dict],
                 eval_dataset: Optional[Sequence[dict]] = None, collator: Optional[Callable] = None,
                 stage: Optional[Callable] = None, tokenizer: Any = None, ctx_extra: Optional[dict] = None,
                 online: Optional[OnlineStage] = None) -> None:
        self.model = model
        self.online = online
        self._queue: list[OnlineStep] = []
        # Ctrl-C / SIGTERM while the step's updates are being applied (from its first optimizer update until
        # global_step counts it) is held until the step is whole: a checkpoint then is of a whole step
        self.interrupt = Interrupt()
        self.config = config = as_train_config(config)
        self.train_dataset = train_dataset
        self.collator = collator or pad_collate
        self.stage_name = config.stage
        if online is not None:
            self.stage, self.count_items = online.loss, online.count_items
        else:
            self.stage = stage or get_stage(self.stage_name)
            self.count_items = item_counter(self.stage_name) if stage is None else getattr(stage, "count_items", None)
        self.output_dir = Path(config.output_dir)
        self.device = next(model.parameters()).device
        self.bs = int(config.per_device_train_batch_size)
        self.eval_bs = int(config.per_device_eval_batch_size)
        self.ga = int(config.gradient_accumulation_steps)
        if self.bs < 1 or self.ga < 1:
            raise LLMTuneError("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
        self.seed = int(config.seed)
        self.ctx = StageContext(config=config, tokenizer=tokenizer, extra=dict(ctx_extra or {}))

        # evaluation: needs eval data; the seed's SFT asks for it without val_size -> notice and go on
        if online is not None and eval_dataset:
            notice(f"stage {self.stage_name} learns from rollouts and has no evaluation loss; the "
                   f"{len(eval_dataset)} evaluation rows are not used")
            eval_dataset = None
        self.eval_dataset = eval_dataset if eval_dataset is not None and len(eval_dataset) > 0 else None
        self.eval_strategy = config.eval_strategy   # one of no, steps, epoch (checked by the config)
        self.load_best = bool(config.load_best_model_at_end)
        if self.eval_dataset is None and (self.eval_strategy != "no" or self.load_best):
            notice(f"eval_strategy {self.eval_strategy!r}/load_best_model_at_end are set but there is no "
                   "evaluation data (set val_size or eval_dataset); training without evaluation")
            self.eval_strategy, self.load_best = "no", False
        if self.load_best and self.eval_strategy == "no":
            notice("load_best_model_at_end needs eval_strategy steps or epoch; ignoring it")
            self.load_best = False
        self.metric = str(config.metric_for_best_model or "eval_loss")
        if not self.metric.startswith("eval_"):
            self.metric = "eval_" + self.metric
        gib = config.greater_is_better
        self.greater_is_better = bool(gib) if gib is not None else not self.metric.endswith("loss")

        # schedule lengths
        if online is not None:
            self.steps_per_epoch = int(online.steps_per_epoch)
        else:
            self.micro_per_epoch = math.ceil(len(self._shard(list(range(len(train_dataset))))) / self.bs)
            self.steps_per_epoch = math.ceil(self.micro_per_epoch / self.ga)
        if self.steps_per_epoch == 0:
            raise LLMTuneError("the training dataset is empty: check dataset, max_samples and val_size")
        max_steps = int(config.max_steps)
        epochs = float(config.num_train_epochs)
        self.total_steps = max_steps if max_steps > 0 else math.ceil(epochs * self.steps_per_epoch)
        if self.total_steps <= 0:
            raise LLMTuneError("nothing to train: set num_train_epochs > 0 or max_steps > 0")
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.logging_steps = max(1, int(_steps(config.logging_steps, self.total_steps)))
        self.save_strategy = config.save_strategy
        self.save_steps = max(1, int(_steps(config.save_steps, self.total_steps)))
        self.eval_steps = max(1, int(_steps(config.eval_steps or self.logging_steps, self.total_steps)))

        # precision, optimizer, schedule
        self.amp_dtype = resolve_precision(bool(config.bf16), bool(config.fp16), self.device.type)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda")
        offload = bool(getattr(config, "offload_activations", False))
        if (config.gradient_checkpointing or offload) and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
            model.offload_activations = offload   # pinned CPU copies of the kept inputs on CUDA (models.memory)
            long_context_malloc(self.device.type, getattr(config, "cutoff_len", 0))   # glibc mmap threshold
        if config.torch_compile and hasattr(model, "compile_layers"):
            model.compile_layers()   # regional compilation: each decoder layer once, dynamic sequence length
        self.model = model = dist_hooks.wrap_model(model, config)  # DDP / FSDP2 under torchrun, else as is
        self.optimizer = build_optimizer(model, config)
        kind = str(config.lr_scheduler_type)
        warm = num_warmup_steps(int(config.warmup_steps), float(config.warmup_ratio), self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(kind, warm, self.total_steps))
        self.max_grad_norm = float(config.max_grad_norm)
        guard.check_policy(config.nonfinite_policy)
        self.report_to = resolve_report_to(config.report_to)

        # state
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.tokens_seen = 0
        self.tokens_at_start = 0   # tokens_seen when this process began training (set again on resume)
        self.examples_seen = 0     # dataset rows trained on, all processes (offline stages; kept in checkpoints)
        self.best_metric: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_state: Optional[dict[str, torch.Tensor]] = None
        self.log_history: list[dict] = []
        self.run_loss = [0.0, 0]   # sum and count of the step losses of the whole run (kept in checkpoints)

    # -- data -------------------------------------------------------------------------------------
    def _shard(self, indices: list[int], pad: bool = True) -> list[int]:
        """This rank's share of an index order (every ``world_size``-th index; padded so that every rank
        gets as many, see ``distributed.shard_indices``)."""
        return shard_indices(indices, rank(), world_size(), pad=pad)

    def epoch_order(self, epoch: int) -> list[int]:
        """The shuffled dataset order of ``epoch``: ``randperm`` from a generator seeded by ``seed + epoch``."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        return self._shard(torch.randperm(len(self.train_dataset), generator=g).tolist())

    def epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        """The optimizer steps of ``epoch``: each a list of micro-batches, each a list of row indices.

        The last step of an epoch may hold fewer micro-batches (and the last micro-batch fewer rows).
        """
        order = self.epoch_order(epoch)
        micro = [order[i:i + self.bs] for i in range(0, len(order), self.bs)]
        return [micro[i:i + self.ga] for i in range(0, len(micro), self.ga)]

    def collate(self, indices: list[int], dataset: Optional[Sequence[dict]] = None) -> dict[str, torch.Tensor]:
        """Collate rows ``indices`` of ``dataset`` (default: the training set) onto the model's device."""
        ds = self.train_dataset if dataset is None else dataset
        batch = self.collator([ds[i] for i in indices])
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    # -- one optimizer step ------------------------------------------------------------------------
    def autocast(self):
        """``torch.autocast`` context for the configured precision (a no-op context for float32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def accumulate_gradients(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int, dict]:
        """Forward + backward all micro-batches of one optimizer step; gradients land in ``param.grad``.

        Every micro-batch back-propagates ``loss_sum / step_items`` where ``step_items`` is the item count
        of the whole step (all micro-batches, summed over ranks), so the accumulated gradient equals that
        of the mean loss over the step's items. Returns ``(step_loss, step_items, metrics)``: the mean loss
        as a float, the item count, and the micro-batch metrics averaged (unweighted).
        """
        counted: Optional[int] = None
        if self.count_items is not None:
            local = sum(int(self.count_items(b)) for b in micro_batches)
            counted = int(all_reduce_sum(torch.tensor(local, dtype=torch.long, device=self.device)).item())
        denom = counted if counted else 1
        loss_total = torch.zeros((), dtype=torch.float32, device=self.device)
        items_seen = 0
        metric_sums: dict[str, float] = {}
        metric_counts: dict[str, int] = {}  # a metric may be absent from a micro-batch (kto: no desirable row)
        for i, batch in enumerate(micro_batches):
            dist_hooks.set_gradient_sync(self.model, i == len(micro_batches) - 1)  # reduce once per step
            with self.autocast():
                loss_sum, n, metrics = self.stage(self.model, batch, self.ctx)
            self.scaler.scale(loss_sum.float() / denom).backward()
            loss_total += loss_sum.detach().float()
            items_seen += int(n)
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
                metric_counts[k] = metric_counts.get(k, 0) + 1
            self.tokens_seen += token_counter(self.stage_name)(batch)   # the stage row's count_tokens
        total_items = int(all_reduce_sum(torch.tensor(items_seen, dtype=torch.long, device=self.device)).item())
        if counted is not None and counted != total_items:
            raise RuntimeError(f"stage {self.stage_name!r}: its item counter gave {counted} items but the "
                               f"stage reported {total_items}")
        if total_items == 0:
            raise LLMTuneError("a training step holds no loss tokens (every label is -100): check cutoff_len "
                               "(long prompts may be cut before the response) and train_on_prompt")
        if counted is None:  # no counter: raw sums were back-propagated; divide the gradients now
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(total_items)
        step_loss = float(all_reduce_sum(loss_total).item()) / total_items
        return step_loss, total_items, {k: v / metric_counts[k] for k, v in metric_sums.items()}

    def optimizer_step(self, loss: Optional[float] = None) -> float:
        """Unscale (fp16), clip to ``max_grad_norm``, step AdamW, zero the gradients (the schedule steps once
        per trainer step, in :meth:`train_step`).

        Returns the gradient norm before clipping (L2 over all trainable parameters). A non-finite ``loss``
        or gradient norm stops the run or skips the step (``nonfinite_policy``, :mod:`llmtune.train.guard`).
        """
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = dist_hooks.clip_grad_norm(params, limit)
        if guard.nonfinite_step(self.global_step + 1, loss, grad_norm, self.output_dir,
                                self.config.nonfinite_policy, self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)  # skip: the weights never see this step
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def next_step(self, steps: Optional[list[list[list[int]]]]) -> OnlineStep:
        """The next step's collated micro-batches: the epoch's next step of row indices (offline), or the
        online stage's next step, calling its ``make_experience`` when the queue is empty."""
        if self.online is None:
            return OnlineStep(updates=[[self.collate(ix) for ix in steps[self.step_in_epoch]]])
        if not self._queue:
            self._queue = list(self.online.make_experience(self))
            if not self._queue:
                raise RuntimeError(f"stage {self.stage_name}: make_experience returned no steps")
        return self._queue.pop(0)

    def train_step(self, step: OnlineStep) -> tuple[float, float, float, dict]:
        """Run every optimizer update of ``step`` (:meth:`accumulate_gradients` + :meth:`optimizer_step`), then
        step the LR schedule once. Returns ``(loss, grad_norm, lr, metrics)``: loss, gradient norm and
        micro-batch metrics averaged over the updates, the learning rate the step used, and the step's
        rollout-level metrics merged in."""
        lr = self.scheduler.get_last_lr()[0]
        losses, norms, sums = [], [], {}
        self.interrupt.updates_done = 0
        self.interrupt.defer = len(step.updates) > 1  # a PPO iteration: whole or not at all, from its start
        for micro in step.updates:
            loss, _, metrics = self.accumulate_gradients(micro)                # 2-3. count, fwd, bwd
            self.interrupt.defer = True  # from the first update until the step is counted: no half step
            norms.append(self.optimizer_step(loss))                           # 4. clip, step (finite guard)
            self.interrupt.updates_done += 1
            losses.append(loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        self.scheduler.step()
        n = len(step.updates)
        out = {k: v / n for k, v in sums.items()}
        out.update(step.metrics)
        return sum(losses) / n, sum(norms) / n, lr, out

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train to ``total_steps``; return LLaMA-Factory's train results (``train_loss``, runtime...).

        Resumes from ``resume_from_checkpoint`` when set. Ctrl-C saves ``checkpoint-<step>`` (the last
        completed step) and re-raises ``KeyboardInterrupt``. SIGTERM (a cluster's preemption or time limit, a
        container's stop, ``kill``) does the same and raises :class:`Terminated` (a ``KeyboardInterrupt``);
        the handler is installed from the main thread only, for the duration of the call.
        """
        with self.interrupt.handlers(lambda: self.global_step + 1):   # llmtune.train.interrupt
            return self._train_loop()

    def _train_loop(self) -> dict[str, Any]:
        self.interrupt.clear()
        if is_main():  # tmp-checkpoint-N of a run killed while saving (the caller holds output_dir's lock)
            ckpt.remove_stale_temporaries(self.output_dir)
        resume = ckpt.resolve_resume(self.config.resume_from_checkpoint, self.output_dir)
        self.run_loss = [0.0, 0]   # sum and count of the step losses of the whole run (kept in checkpoints)
        if resume is not None:
            self._load(resume)
        if is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
        logger = TrainLogger(self.output_dir, self.total_steps, self.report_to, enabled=is_main(),
                             resume_step=self.global_step if resume is not None else None,
                             initial_step=self.global_step, progress=not self.config.disable_tqdm,
                             run_config=self.config, history=self.log_history)
        self.model.train()
        start = time.time()
        start_step = self.global_step
        self.tokens_at_start = self.tokens_seen   # a resumed run's throughput counts only its own tokens
        window_loss, window_steps, window_metrics = 0.0, 0, {}
        try:
            while self.global_step < self.total_steps:
                steps = self.epoch_steps(self.epoch) if self.online is None else None
                n_steps = len(steps) if steps is not None else self.steps_per_epoch
                while self.step_in_epoch < n_steps and self.global_step < self.total_steps:
                    self.interrupt.start_step(ckpt.capture_rng_state(), self.online_state())
                    self.ctx.global_step, self.ctx.training = self.global_step, True
                    step = self.next_step(steps)                # 1. pre-fetch the step (online: rollouts)
                    rows = 0 if steps is None else sum(map(len, steps[self.step_in_epoch])) * world_size()
                    self.interrupt.updates_planned = len(step.updates)
                    loss, grad_norm, lr, metrics = self.train_step(step)       # 2-4. count, fwd, bwd, clip, step
                    self.global_step += 1
                    self.step_in_epoch += 1
                    self.examples_seen += rows   # every rank holds as many rows (shard_indices pads)
                    self.interrupt.step_counted()  # from here a signal saves the state as it is now
                    logger.advance()
                    window_loss, window_steps = window_loss + loss, window_steps + 1
                    self.run_loss = [self.run_loss[0] + loss, self.run_loss[1] + 1]
                    for k, v in metrics.items():
                        window_metrics[k] = window_metrics.get(k, 0.0) + v
                    end_of_epoch = self.step_in_epoch == n_steps
                    if self.global_step % self.logging_steps == 0 or self.global_step == self.total_steps:
                        vals = {"loss": round(window_loss / window_steps, 6), "lr": lr, "grad_norm": grad_norm}
                        vals.update({k: v / window_steps for k, v in window_metrics.items()})
                        self.log_history.append(logger.log(self.global_step, self.epoch_float(), vals,
                                                           self.tokens_seen - self.tokens_at_start))
                        window_loss, window_steps, window_metrics = 0.0, 0, {}
                    if (self.eval_strategy == "steps" and self.global_step % self.eval_steps == 0) or (
                            self.eval_strategy == "epoch" and end_of_epoch):
                        metrics_eval = self.evaluate()
                        self.log_history.append(logger.log(self.global_step, self.epoch_float(), metrics_eval,
                                                           self.tokens_seen - self.tokens_at_start))
                        self._track_best(metrics_eval)
                    if (self.save_strategy == "steps" and self.global_step % self.save_steps == 0) or (
                            self.save_strategy == "epoch" and end_of_epoch):
                        self.save_checkpoint()
                    self.interrupt.raise_pending()  # a signal held during the step's updates: the step is whole
                if self.step_in_epoch >= n_steps:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
        except KeyboardInterrupt as stop:
            how = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
            self.interrupt.clear()
            self.optimizer.zero_grad(set_to_none=True)
            if self.interrupt.updates_done:  # a multi-update (PPO) step stopped half-way: of no step
                notice(f"interrupted during step {self.global_step + 1} after {self.interrupt.updates_done} of its "
                       "optimizer updates, so no checkpoint of it is saved; continue from the last saved one, "
                       f"{ckpt.last_checkpoint_text(self.output_dir)}")
            elif self.online is not None and world_size() > 1:
                # the ranks may stop at different points of a step: a checkpoint needs every rank at the same
                # step (save_online_checkpoint is a collective), so only the periodic ones are complete
                if is_main():
                    notice(f"{how} at step {self.global_step}: a multi-process {self.stage_name} run saves no "
                           "checkpoint on Ctrl-C; continue from the last one saved by save_steps, "
                           f"{ckpt.last_checkpoint_text(self.output_dir)}")
            elif self.global_step > start_step:
                path = self.save_checkpoint(rng_state=self.interrupt.rng_at_step_start,
                                            online=self.interrupt.online_at_step_start)
                notice(f"{how}: saved {path}; continue with resume_from_checkpoint: {path}")
            elif is_main():   # no step completed: a checkpoint-0 would hold the untrained weights (issue 25)
                notice(f"{how} before any step completed: nothing to save" + (
                    f"; {resume} is still the latest checkpoint" if resume is not None else ""))
            logger.close()
            raise
        except Exception:
            logger.close()  # the progress bar ends its line before the error is printed
            raise
        logger.close()
        if self.load_best and self.best_state is not None:
            ckpt.load_trainable_state_dict(dist_hooks.unwrap(self.model), self.best_state, f"best step {self.best_step}")
            notice(f"loaded the best model (step {self.best_step}, {self.metric} = {self.best_metric:.4g})")
        runtime = time.time() - start
        done = self.global_step - start_step
        results = {"epoch": round(self.epoch_float(), 4),
                   "train_loss": self.run_loss[0] / self.run_loss[1] if self.run_loss[1] else float("nan"),
                   "train_runtime": round(runtime, 4),
                   "train_samples_per_second": round(done * self.bs * self.ga * world_size() / runtime, 3) if runtime else 0.0,
                   "train_steps_per_second": round(done / runtime, 3) if runtime else 0.0,
                   "train_tokens_per_second": round((self.tokens_seen - self.tokens_at_start) / runtime, 2)
                   if runtime else 0.0}
        return results

    def epoch_float(self) -> float:
        """Fractional epochs completed (``epoch + step_in_epoch / steps_per_epoch``)."""
        return self.epoch + self.step_in_epoch / self.steps_per_epoch

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Optional[Sequence[dict]] = None, quiet: bool = False) -> dict[str, float]:
        """Mean loss over all items of the eval set (``eval_loss``) plus the stage's metrics (``eval_*``).

        The loss is ``sum(loss_sum) / sum(items)`` over every eval batch (and rank); metrics are averaged
        weighted by each batch's items. The model is put back in training mode afterwards. A progress bar
        shows on the main process unless ``quiet`` or ``disable_tqdm``.
        """
        ds = self.eval_dataset if dataset is None else dataset
        if ds is None:
            raise LLMTuneError("evaluation needs eval data: set val_size or eval_dataset")
        self.model.eval()
        self.ctx.training = False
        order = self._shard(list(range(len(ds))), pad=dist_hooks.is_fsdp(self.model))  # FSDP: same batch count
        loss_total, items_total = 0.0, 0
        metric_sums: dict[str, float] = {}
        bar = is_main() and not quiet and not self.config.disable_tqdm
        for i in eval_report.progress(range(0, len(order), self.eval_bs), -(-len(order) // self.eval_bs), "eval", bar):
            batch = self.collate(order[i:i + self.eval_bs], ds)
            with self.autocast():
                loss_sum, n, metrics = self.stage(self.model, batch, self.ctx)
            loss_total += float(loss_sum)
            items_total += int(n)
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * int(n)
        sums = all_reduce_sum(torch.tensor([loss_total, float(items_total)] + list(metric_sums.values()),
                                            dtype=torch.float64, device=self.device)).tolist()
        self.model.train()
        self.ctx.training = True
        items = max(sums[1], 1.0)
        out = {"eval_loss": sums[0] / items}
        out.update({f"eval_{k}": s / items for k, s in zip(metric_sums, sums[2:])})
        return out

    def _track_best(self, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise LLMTuneError(f"metric_for_best_model: {self.metric!r} is not among the eval metrics "
                               f"({', '.join(sorted(metrics))})")
        value = metrics[self.metric]
        better = self.best_metric is None or (value > self.best_metric if self.greater_is_better
                                              else value < self.best_metric)
        if better:
            self.best_metric, self.best_step = value, self.global_step
            if self.load_best:  # trainable weights only: small for LoRA
                self.best_state = {k: v.clone() for k, v in
                                   ckpt.trainable_state_dict(dist_hooks.unwrap(self.model)).items()}

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The JSON trainer state saved in checkpoints (step, data position, best metric, log history)."""
        return {"global_step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "total_steps": self.total_steps, "tokens_seen": self.tokens_seen, "examples_seen": self.examples_seen,
                "best_metric": self.best_metric,
                "best_global_step": self.best_step, "stage": self.stage_name, "seed": self.seed,
                "per_device_train_batch_size": self.bs, "gradient_accumulation_steps": self.ga,
                "world_size": world_size(), "log_history": self.log_history, **resume_rules.extra_state(self)}

    def online_state(self) -> Optional[tuple[dict, list]]:
        """``(stage.state_dict(), pending steps)`` of the online stage, or None (offline, or a stage without
        ``state_dict``). The steps are the queue's own objects: nothing modifies them once made."""
        if self.online is None or not hasattr(self.online, "state_dict"):
            return None
        return self.online.state_dict(), list(self._queue)

    def save_checkpoint(self, rng_state: Optional[dict] = None,
                        online: Optional[tuple[dict, list]] = None) -> Optional[Path]:
        """Write ``output_dir/checkpoint-<global_step>`` in the format the run needs and rotate by
        ``save_total_limit`` (:func:`llmtune.train.checkpointer.save`; every rank calls it, rank 0 gets the path).
        ``rng_state`` / ``online`` (an online stage's state and queue): those of a step's start (an interrupted
        step), else the current ones."""
        return checkpointer.save(self, rng_state, online)

    def load_state_dict(self, state: dict[str, Any], folder: Path) -> None:
        """Take a checkpoint's trainer state (:meth:`state_dict`) as this run's position: step, epoch, tokens,
        best metric (and, for ``load_best_model_at_end``, the best weights), log history.

        Raises:
            LLMTuneError: the checkpoint was trained with another batch size, accumulation or seed.
        """
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "seed"):
            if state.get(key) is not None and state[key] != self.state_dict()[key]:
                raise LLMTuneError(f"resume_from_checkpoint: {folder} was trained with {key} = {state[key]}, "
                                   f"this run has {self.state_dict()[key]}; use the same value to resume")
        self.global_step = int(state["global_step"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.examples_seen = int(state["examples_seen"]) if "examples_seen" in state else int(round(   # older
            self.epoch_float() * len(self.train_dataset))) if self.online is None else 0          # checkpoints
        self.best_metric, self.best_step = state.get("best_metric"), state.get("best_global_step")
        if self.load_best and self.best_step is not None:
            self.best_state = resume_rules.best_state_at_resume(self, folder)
        self.log_history = list(state.get("log_history", []))

    def _load(self, folder: Path) -> None:
        state, rng, online = checkpointer.load(self, folder)   # weights, optimizer, schedule: any format
        self.load_state_dict(state, folder)
        if online is not None:
            self.online.load_state_dict(online[0])
            self._queue = online[1]
        resume_rules.apply_on_resume(self, folder, state)
        if self.global_step >= self.total_steps:
            notice(f"resume_from_checkpoint: {folder} is already at step {self.global_step} of {self.total_steps}; "
                   "nothing left to train (raise max_steps or num_train_epochs to train further)")
        ckpt.restore_rng_state(rng)


def _steps(value: Any, total: int) -> float:
    """Hugging Face's rule: a value below 1 is a fraction of the total steps."""
    value = float(value)
    return math.ceil(value * total) if 0 < value < 1 else value

