"""The training loop: one YAML config in, an adapter, checkpoints, metrics and a summary out.

    result = lorakit.train.train("configs/tiny_llama_alpaca.yaml", overrides=["training.lr=1e-4"])

One optimizer step consumes one *global batch* of ``batch_size x grad_accumulation x world_size`` rows
(``lorakit.train.collate.BatchPlan``, deterministic in (seed, epoch)); each process takes a disjoint slice
and splits it into ``grad_accumulation`` micro-batches. The loss of a micro-batch is its summed loss
divided by the number of targets in the *global* batch (times world size, because DDP averages
gradients), so the update equals that of one process on the whole global batch, however it is split.

Per step (the callback order of ``lorakit.train.callbacks``):
    loss = task_loss + sum(extra_loss); backward per micro-batch -> on_after_backward -> clip grad norm
    -> optimizer.step(); scheduler.step() -> on_step_end -> zero_grad.
A step whose loss or gradient norm is not finite (on any rank) is skipped: no update (optimizer state
untouched, callbacks' step hooks not called), counted; ``max_nonfinite`` such steps in a row stop the run
with ``NonFiniteLossError`` and leave the last checkpoint as it was. A skipped step still advances the data
position, the step counter and the lr schedule (``lorakit.train.nonfinite``: fp16 loss-scale overflows).

Checkpoints (``lorakit.train.checkpoint``) hold the adapter, optimizer, scheduler, grad scaler, RNG
states, data position (epoch, batch index), counters and callback states, so ``resume=True`` continues
exactly where the checkpoint was written.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed as dd
from lorakit.train import fsdp, host_memory, rundir, stopping
from lorakit.train.build import (
    build_run_model,
    calibration_run,
    compiled_blocks,
    load_data,
    make_optimizer,
    optimizer_groups,
)
from lorakit.train.callbacks import Callback, TrainState
from lorakit.train.collate import BatchPlan, Collator
from lorakit.train.config import RunConfig, load_run_config
from lorakit.train.evaluate import evaluate, n_targets
from lorakit.train.loss import TaskLoss
from lorakit.train.lr_rule import auto_lr
from lorakit.train.metrics import peak_memory
from lorakit.train.nonfinite import Skip, grad_skip, grads_not_finite
from lorakit.train.precision import resolve_precision
from lorakit.train.progress import Progress, Resumable
from lorakit.train.schedule import make_scheduler, warmup_steps
from lorakit.train.steplog import StepLog
from lorakit.train.summary import (
    TrainResult,
    already_complete,
    result_of,
    run_summary,
    start_line,
    write_summary,
)
from lorakit.train.tracking import check_installed, open_trackers

__all__ = ["NonFiniteLossError", "TrainResult", "train"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


def _take(it: Iterator[dict[str, torch.Tensor]], n: int) -> list[dict[str, torch.Tensor]]:
    return [next(it) for _ in range(n)]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    config: RunConfig | str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train an adapter as ``config`` says (a ``RunConfig`` or a YAML path plus ``--set`` overrides).

    Under torchrun every process calls this; only rank 0 writes files. Raises ``ConfigError``,
    ``DataError``, ``OutputDirError``, ``CheckpointError`` or ``NonFiniteLossError`` (one-line messages);
    Ctrl-C or SIGTERM raise ``TrainingStopped`` (a ``KeyboardInterrupt`` naming the last checkpoint).
    """
    cfg = config if isinstance(config, RunConfig) else load_run_config(config, overrides)
    d = dd.setup(cfg.training.device, cfg.training.distributed_timeout_s)
    try:
        fsdp.resolve_mode(cfg.training.distributed, d)  # a mode this launch cannot run: refused before any work
        where, resume_from = rundir.prepare(cfg.output.dir, resume, overwrite, d.is_main)
        dd.barrier(d)
        try:
            with stopping.sigterm_raises():
                result = _Run(cfg, d, where, resume_from, list(callbacks)).run()
        except BaseException as e:
            where.discard(d.is_main)  # an overwrite that failed before its swap leaves the old run as it was
            def last() -> str | None:
                return ckpt.latest_checkpoint(os.path.join(cfg.output.dir, "checkpoints"))

            if d.enabled and dd.is_peer_failure(e):
                first = (str(e).splitlines() or [type(e).__name__])[0][:300]
                raise dd.PeerLostError(
                    f"rank {d.rank}: lost contact with the other processes ({first}); another rank stopped "
                    f"(see its log). Last checkpoint: {last() or 'none'}; continue with --resume"
                ) from None
            if isinstance(e, KeyboardInterrupt) and not isinstance(e, stopping.TrainingStopped):
                raise stopping.stopped(e, d.rank if d.enabled else None, last()) from None
            raise
        # rank 0 still writes files after the loop; destroying the process group while a peer is
        # mid-collective aborts that process ("terminate called without an active exception")
        dd.barrier(d)
        return result
    finally:
        dd.teardown(d)


class _Run:
    """One call of :func:`train`: the parts built from the config, then :meth:`run`."""

    def __init__(
        self, cfg: RunConfig, d: dd.Dist, where: rundir.RunDir, resume_from: str | None, user_cbs: list[Callback]
    ):
        from lorakit.adapters.base import method_callbacks
        from lorakit.bench.params import efficiency_report
        from lorakit.train.tokenizer import load_tokenizer, pad_id

        self.cfg, self.d, t = cfg, d, cfg.training
        self.dir, self.resume_from = where, resume_from
        check_installed(t.report_to)  # before the model loads: a missing tracker fails at once
        host_memory.apply_config(t.return_freed_memory)  # before the model's allocations
        _seed_all(t.seed)
        self.mode = fsdp.resolve_mode(t.distributed, d)  # none | ddp | fsdp
        self.precision = resolve_precision(t.mixed_precision, d.device)
        tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
        self.train_ds, self.val_ds, reports = load_data(cfg, tok)
        self.task = cfg.data.task
        self.num_labels = len(self.train_ds.label_names or [])
        if self.mode == "fsdp":
            fsdp.check_rows(len(self.train_ds), d, cfg.data.train)
        calibrate = calibration_run(cfg.adapter, self.train_ds.examples, Collator(pad_id(tok), "group", None, self.task),
                                    d.device, self.precision.autocast(d.device))
        self.model = build_run_model(cfg, max(self.num_labels, 2), pad_id(tok), self.precision, d.device,
                                     build_on=fsdp.build_device(self.mode, d), calibrate=calibrate)
        self.report = efficiency_report(self.model)
        self.replicated: list[torch.nn.Parameter] = []  # trainable tensors FSDP leaves whole (AdaLoRA)
        self.rank_mem: dict[str, int] | None = None  # FSDP: fsdp.rank_memory after the first step
        if self.mode == "fsdp":  # the model itself is sharded in place; its forward gathers block by block
            method = cfg.adapter.method if cfg.adapter else None
            self.replicated = fsdp.prepare(self.model, method, d, self.precision.name)
        # the loss runs inside the wrapped forward; built after sharding, so a sharded root keeps the full path
        self.loss = TaskLoss(self.model, self.task)
        self.ddp = self.loss if self.mode == "fsdp" else dd.wrap_ddp(self.loss, d)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.lr_auto = None if t.lr != "auto" else auto_lr(
            cfg.adapter.method if cfg.adapter else None, self.report.base_params, cfg.quant is not None
        )
        lr = self.lr_auto.lr if self.lr_auto else t.lr
        self.opt, self.optimizer_impl = make_optimizer(
            optimizer_groups(self.model, t.weight_decay, lr), lr, t.betas, t.eps, sharded=self.mode == "fsdp"
        )
        self.global_batch = t.batch_size * t.grad_accumulation * d.world_size
        self._build_batches(pad_id(tok))
        self.total = t.max_steps if t.max_steps is not None else t.epochs * len(self.plan)
        self.sched = make_scheduler(
            self.opt, self.total, warmup_steps(self.total, t.warmup_ratio, t.warmup_steps), t.schedule
        )
        self.scaler = torch.amp.GradScaler(d.device.type) if self.precision.scaler else None
        self.callbacks = method_callbacks(self.model) + user_cbs
        self.state = TrainState(model=self.model, total_steps=self.total, optimizer=self.opt)
        self.res = Resumable(
            self.state, Progress(), self.opt, self.sched, self.scaler, self.callbacks, self.global_batch, t.seed,
            fsdp.ShardedOptimizerState(self.model, self.opt) if self.mode == "fsdp" else None,
        )
        if d.is_main:
            for r in reports:
                print(r.table())
            if self.lr_auto is not None:
                print(f"training.lr=auto: {self.lr_auto.lr:g} for {self.lr_auto.why}")
            print(start_line(cfg.model.name, self.report, self.precision, self.loss, self.total, self.global_batch,
                             d.device, compiled_blocks(self.model)))

    def _build_batches(self, pad: int) -> None:
        """The batch plan (global batches per epoch), the collators and each example's target count."""
        cfg, t, mode = self.cfg, self.cfg.training, self.cfg.data.batching
        self.plan = BatchPlan(
            self.train_ds.lengths, self.global_batch, mode, cfg.data.max_length, t.seed,
            shuffle=True, drop_last=True,
        )
        self.collate = Collator(pad, mode, cfg.data.max_length, self.task)
        if mode == "pack":  # packed rows must not attend across examples: verify on this model, once
            from lorakit.train.collate import check_packing

            check_packing(self.model)
        self.eval_collate = Collator(pad, "group", None, self.task)
        if len(self.plan) == 0:
            raise ValueError(
                f"{cfg.data.train}: {len(self.train_ds)} rows make no full global batch of {self.global_batch} "
                f"(batch_size {t.batch_size} x grad_accumulation {t.grad_accumulation} x "
                f"{self.d.world_size} processes)"
            )
        self.targets = [n_targets(ex, self.task) for ex in self.train_ds.examples]

    @property
    def progress(self) -> Progress:
        return self.res.progress

    # --- the loop ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if self.resume_from:
            self.res.restore(self.resume_from, self.model)
            done = already_complete(self.dir.path, self.state.step, self.total, self.d.is_main)
            if done is not None:
                return done
            if self.d.is_main:
                print(f"resuming from step {self.state.step} of {self.total} ({self.resume_from})")
        try:
            self._begin()
            self.log.start_clock()
            start_tokens = self.progress.tokens
            for gb, fetch, per_epoch in self._global_batches():
                self._train_step(gb, fetch)
                self._evaluate_or_save(end_of_epoch=self.progress.batch_index == per_epoch)
            self.log.close_bar()
            return self._finish(self.log.elapsed(), start_tokens)
        except BaseException:
            if hasattr(self, "log"):  # the trackers were opened: close them, the run marked failed
                self.log.abort_sinks()
            raise

    def _begin(self) -> None:
        """The output directory, the metrics log, the callbacks' start and the evaluation before training."""
        cfg, out, main = self.cfg, self.dir.path, self.d.is_main
        if main:
            os.makedirs(out, exist_ok=True)
            ckpt.remove_partial(os.path.join(out, "checkpoints"))
            ckpt.write_json(cfg.to_dict(), os.path.join(out, "run_config.json"))
        resumed = self.resume_from is not None
        resume_step = self.state.step if resumed else None
        trackers = []
        if main:
            name, staged = os.path.basename(self.dir.final), self.dir.staging is not None
            trackers = open_trackers(cfg.training.report_to, out, cfg.to_dict(), resume_step, name, staged)
        self.log = StepLog(
            os.path.join(out, "metrics.jsonl") if main else None,
            resume_step,
            cfg.training.log_every,
            self.total,
            trackers,
        )
        for cb in self.callbacks:
            cb.on_train_begin(self.state)
        if not resumed and cfg.training.eval_at_start:
            self.progress.eval_before = self._evaluate()
        if main and cfg.output.progress:
            self.log.open_bar(initial=self.state.step)

    def _global_batches(self) -> Iterator[tuple[list[list[int]], Callable[[], list], int]]:
        """From the data position on, until the last step: each global batch, a function that loads this
        rank's micro-batches of it, and the number of global batches in its epoch."""
        pg, t, d = self.progress, self.cfg.training, self.d
        B, A = t.batch_size, t.grad_accumulation
        while self.state.step < self.total:
            batches = self.plan.batches(pg.epoch)
            mine = [self.plan.shard(b, d.rank, d.world_size) for b in batches[pg.batch_index :]]
            micro = [m[i * B : (i + 1) * B] for m in mine for i in range(A)]
            loader = torch.utils.data.DataLoader(
                self.train_ds,
                batch_sampler=[[tuple(r) for r in mb] for mb in micro],
                collate_fn=self.collate,
                num_workers=self.cfg.workers,
                generator=torch.Generator().manual_seed(t.seed + pg.epoch),
                worker_init_fn=stopping.default_sigterm if self.cfg.workers else None,
            )
            it = iter(loader)
            for gb in batches[pg.batch_index :]:
                if self.state.step >= self.total:
                    return
                yield gb, functools.partial(_take, it, A), len(batches)
            pg.epoch, pg.batch_index = pg.epoch + 1, 0

    def _train_step(self, gb: list[list[int]], fetch: Callable[[], list]) -> None:
        """One optimizer step on global batch ``gb`` (or its skip), its counters and its log line."""
        pg = self.progress
        t0, lr = time.perf_counter(), self.sched.get_last_lr()[0]  # the lr this step uses
        n_tgt = sum(self.targets[i] for row in gb for i in row)
        loss, norm, skip = self._step(fetch(), max(n_tgt, 1))
        pg.batch_index += 1
        real = self.plan.real_tokens(gb)
        pg.tokens += real
        if skip is not None:
            self._skipped(skip)
        else:
            pg.nonfinite_run = 0
            pg.last_loss = loss
        dt = time.perf_counter() - t0
        self.log.step(self.state.step, pg.epoch, loss, lr, norm, pg.tokens, real, dt, self.state.metrics)

    def _evaluate_or_save(self, end_of_epoch: bool) -> None:
        """Evaluate and checkpoint when ``eval_every`` / ``save_every`` say (None: at each epoch's end)."""
        t, step, save_every = self.cfg.training, self.state.step, self.cfg.output.save_every
        if (t.eval_every and step % t.eval_every == 0) or (t.eval_every is None and end_of_epoch):
            self._evaluate()
        if save_every and step % save_every == 0 or save_every is None and end_of_epoch:
            self._save()

    def _finish(self, elapsed: float, start_tokens: int) -> TrainResult:
        """After the last step: the last evaluation and checkpoint, an --overwrite run swapped in, the
        callbacks' end, the adapter, and the summary."""
        cfg, d, pg = self.cfg, self.d, self.progress
        if pg.last_eval_step != self.state.step:
            self._evaluate()
        if cfg.output.save_every != 0:
            self._save()
        self._promote()
        out = self.dir.path
        for cb in self.callbacks:
            cb.on_train_end(self.state)
        adapter_dir = None
        # under FSDP every rank gathers the full adapter; rank 0 writes it (never a shard)
        with fsdp.gathered_adapters(self.model) if self.mode == "fsdp" else contextlib.nullcontext():
            rank_diff = dd.max_rank_difference([p for p in self.model.parameters() if p.requires_grad], d)
            if d.is_main:
                card = {"data": cfg.data.train, "steps": self.state.step, "metrics": pg.last_eval}
                adapter_dir = ckpt.save_final_adapter(self.model, os.path.join(out, "adapter"), cfg.model.name, card)
        setup = {
            "world_size": d.world_size,
            "global_batch": self.global_batch,
            "precision": self.precision.name,
            "precision_why": self.precision.why,
            "optimizer": f"adamw ({self.optimizer_impl})",
            "compile": compiled_blocks(self.model),
            "device": str(d.device),
        }
        summary = run_summary(
            pg, self.state.step, elapsed, start_tokens, setup, peak_memory(d.device), adapter_dir, rank_diff,
            self.report.as_dict(),
        )
        if self.lr_auto is not None:
            summary["lr_auto"] = self.lr_auto.as_dict()
        if self.mode == "fsdp":  # what each rank held after its first step, by kind (lorakit plan --calibrate)
            summary["fsdp_memory_per_rank"] = fsdp.gather_rank_memory(self.rank_mem, d)
        summary.update(self.state.summary)  # what callbacks resolved (AdaLoRA's schedule in steps)
        if d.is_main:
            write_summary(summary, out, self.log.records, cfg.output.plot, f"{cfg.model.name} ({self.task})")
            self.log.finish_sinks([os.path.join(out, "summary.json"), os.path.join(out, "loss_curve.png")])
        return result_of(out, summary, pg, self.state.step)

    # --- evaluation and checkpoints ------------------------------------------------------------------
    def _evaluate(self) -> dict[str, float] | None:
        """Evaluate on the validation set (None without one) and log the metrics at this step."""
        if self.val_ds is None:
            return None
        bs = self.cfg.training.eval_batch_size or self.cfg.training.batch_size
        autocast = self.precision.autocast(self.d.device)
        m = evaluate(
            self.loss, self.val_ds, self.eval_collate, self.task, bs, self.d, autocast, self.num_labels,
            lockstep=self.mode == "fsdp",
        )
        for cb in self.callbacks:
            cb.on_evaluate(self.state, m)
        self.progress.last_eval, self.progress.last_eval_step = m, self.state.step
        self.log.evaluation(self.state.step, m)
        return m

    def _save(self) -> None:
        if self.progress.saved_step == self.state.step:  # e.g. the end of the run right after a periodic save
            return
        self.progress.saved_step = self.state.step
        sharded = self.mode == "fsdp"  # gathering the adapter and optimizer state is collective
        trainable = fsdp.full_trainable_state(self.model) if sharded else None
        state = self.res.state_dict() if sharded or self.d.is_main else None
        if self.d.is_main:
            root = os.path.join(self.dir.path, "checkpoints")
            ckpt.save_checkpoint(root, self.state.step, self.model, state, self.cfg.output.keep_last, trainable)
        self._promote()
        dd.barrier(self.d)

    def _promote(self) -> None:
        """An --overwrite run replaces the previous one now that it has a checkpoint (or has ended)."""
        if self.dir.staging is not None:
            self.log.pause()
        self.dir.promote(self.d.is_main)
        self.log.move(os.path.join(self.dir.path, "metrics.jsonl"))

    # --- one optimizer step ------------------------------------------------------------------------
    def _step(
        self, micro: list[dict[str, torch.Tensor]], n_tgt: int
    ) -> tuple[float, float | None, Skip | None]:
        """Forward/backward over this rank's micro-batches and an update.

        Returns (global mean loss, grad norm, None), or (loss, None, why) when the step is skipped."""
        d, autocast = self.d, self.precision.autocast(self.d.device)
        local, extra_val = 0.0, 0.0
        for i, batch in enumerate(micro):
            batch = {k: v.to(d.device, non_blocking=True) for k, v in batch.items()}
            sync = self.ddp is self.loss or i == len(micro) - 1  # DDP: all-reduce on the last micro-batch
            with self.ddp.no_sync() if not sync else contextlib.nullcontext():
                with autocast():
                    loss_sum, _ = self.ddp(batch)
                loss = loss_sum * (d.world_size / n_tgt)
                if i == 0:
                    extras = [
                        e for e in (cb.extra_loss(self.state) for cb in self.callbacks) if e is not None
                    ]
                    if extras:
                        extra = sum(extras)
                        extra_val = float(extra.detach())
                        loss = loss + extra
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            local += float(loss_sum.detach())
        fsdp.average_replicated_grads(self.replicated, d)  # FSDP leaves AdaLoRA's whole tensors to us
        # the gradient check rides on the loss all-reduce: a non-finite norm on any rank skips on all
        bad_local = grads_not_finite(self.params)
        total, extra_sum, bad = dd.all_sum([local, extra_val, float(bad_local)], d)
        mean = total / n_tgt + extra_sum / d.world_size
        if not math.isfinite(mean) or bad:
            finite = math.isfinite(mean)
            skip = grad_skip(mean, self.opt, self.scaler) if finite else Skip(f"loss is {mean}")
            self.opt.zero_grad(set_to_none=True)
            return mean, None, skip
        self.state.loss = mean
        for cb in self.callbacks:
            cb.on_after_backward(self.state)
        if self.scaler:
            self.scaler.unscale_(self.opt)
        max_norm = self.cfg.training.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm else float("inf"))
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.state.step += 1
        for cb in self.callbacks:
            cb.on_step_end(self.state)
        if self.mode == "fsdp" and self.rank_mem is None:  # per-rank bytes at rest, once (summary.json)
            self.rank_mem = fsdp.rank_memory(self.model, self.opt)
        self.opt.zero_grad(set_to_none=True)
        return mean, float(norm), None

    def _skipped(self, skip: Skip) -> None:
        """Book a skipped step: it advances the step counter and the lr schedule, nothing else."""
        pg, out = self.progress, self.dir.path
        pg.skipped += 1
        pg.nonfinite_run += skip.counts
        self.state.step += 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore")
            self.sched.step()
        if self.d.is_main:
            print(f"warning: step {self.state.step}: {skip.why}; step skipped", file=sys.stderr)
        if pg.nonfinite_run >= self.cfg.training.max_nonfinite:
            last = ckpt.latest_checkpoint(os.path.join(out, "checkpoints"))
            raise NonFiniteLossError(
                f"the loss or gradient norm was not finite for {pg.nonfinite_run} steps in a row (up to "
                f"step {self.state.step}); training stopped. Last good checkpoint: {last or 'none'}. "
                "Lower training.lr or check the data."
            )
