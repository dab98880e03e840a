"""MELO and MAML meta-training of a sequential recommender, and testing.

    python main.py --model=bert4rec ...                          # MELO
    python main.py --model=bert4rec ... --use_adaptive_loss=False  # MAML
    python main.py ... --test --checkpoint_step=N                # test a checkpoint
    python main.py ... --checkpoint_step=N                       # resume training
"""
import os
import signal

if __name__ == "__main__":  # Ctrl-C during the slow imports below: a quiet exit 130 (run_cli takes over).
    # os._exit, not sys.exit: an exception raised inside torch's C++ import code aborts the process.
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))

import math
import random
import shutil

import numpy as np
import torch
from tqdm import tqdm

import distributed
import evaluation
from atomic_files import atomic_save
from config import MethodConfig, ModelConfig, TaskConfig
from dataloader import TaskSampler
from experiment import (MIN_LSTM_LR, UserError, check_identity, checkpoint_pattern, checkpoint_steps, load_checkpoint,
                        load_matching_state, log_metrics, make_dirs, mean_rating_results_name,
                        pretrained_embedding_path, pretrained_model_path, pretraining_command, print_training_summary,
                        refuse_earlier_run, run_cli, run_folder, run_identity, setup, step_to_test, test_results_name)
from meta_learner import MetaLearner, importance_vector
from models import model_factory

GRADIENT_CLIP_NORM = 5.0
EVALUATION_CHUNK = 64  # tasks adapted at once when there is no outer graph
# The flags that a resumed run may change: learning rates and the length of the run go to
# the optimisers and schedulers; the rest change how the same computation runs, or where
# things go. Every other setting must be the checkpoint's.
RATE_OF_OPTIMIZER = {"meta": "outer_lr", "encoder": "lstm_lr", "inner_lr": "learn_lr",
                     "task_info": "task_info_lr", "loss_network": "loss_lr"}
MAY_CHANGE_ON_RESUME = {
    *RATE_OF_OPTIMIZER.values(), "min_outer_lr", "loss_weight_decay", "num_train_iterations",
    "log_interval", "batch_size", "checkpoint_step", "test", "test_best", "test_baseline", "log_dir",
    "device", "use_vmap", "tasks_per_pass", "support_chunks", "recompute_inner_steps", "download_url",
    "load_pretrained_embedding", "load_pretrained", "save_pretrained", "pretrain_log_dir",
    "pretrain_epochs", "pretraining_lr", "pretraining_batch_size", "use_learned_loss_baseline", "overwrite",
}
UNREAD_FLAGS = ("num_users", "num_items")  # reference flags that nothing reads (earlier versions stored the data's sizes)


class MetaTrainer:
    """Meta-training state: the learner, its optimisers and schedulers, the task sampler
    and the bookkeeping that a checkpoint must hold to resume a run exactly."""

    def __init__(self, args, data, device):
        self.args = args
        self.data = data
        self.device = device
        self.sampler = TaskSampler(data, TaskConfig.from_args(args))
        model = model_factory(ModelConfig.from_args(args, data.num_items))
        if args.test:
            pass  # the checkpoint holds every parameter: nothing pretrained is needed
        elif args.load_pretrained_embedding:
            self._load_pretrained(model.embedding, pretrained_embedding_path(args), "embedding")
        elif args.load_pretrained:
            self._load_pretrained(model, pretrained_model_path(args), "model")
        self.learner = MetaLearner(model, MethodConfig.from_args(args)).to(device)
        self.method = self.learner.method
        self.optimizers, self.schedulers = self._build_optimizers()

        self.iteration = 0
        self.best_valid_rmse = math.inf
        self.best_step = 0
        self.run_dir = run_folder(args, args.log_dir)
        self.save_dir = self.run_dir / "state"
        self.best_pattern = checkpoint_pattern(args.model, args.mode, self.method, best=True)
        self.every_pattern = checkpoint_pattern(args.model, args.mode, self.method, best=False)

    def _load_pretrained(self, module, path, what):
        if not path.is_file():
            raise UserError(f"no pretrained {what} at {path}; make it first with: "
                            f"{pretraining_command(self.args)}")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            identity, state = saved["identity"], saved["state"]
        except Exception as error:
            raise UserError(f"cannot read pretrained {what} {path}: {error}; make it again with: "
                            f"{pretraining_command(self.args)}") from None
        check_identity(identity, self.args, f"pretrained {what} {path}", pretraining_command(self.args))
        load_matching_state(module, state, f"pretrained {what} {path}", pretraining_command(self.args))
        print(f"Loaded pretrained {what} from {path}")

    def _build_optimizers(self):
        """Adam on θ (cosine to min_outer_lr), on the LSTM encoder (cosine to 1e-2), on
        the inner rates α, and on the MLP encoder and loss network when they are used."""
        args, learner = self.args, self.learner
        T = args.num_train_iterations
        meta = torch.optim.Adam(learner.model.parameters(), lr=args.outer_lr)
        optimizers = {"meta": meta}
        schedulers = {"meta": torch.optim.lr_scheduler.CosineAnnealingLR(
            meta, T_max=T, eta_min=args.min_outer_lr)}
        if args.use_learnable_params:
            optimizers["inner_lr"] = torch.optim.Adam(learner.inner_optimizer.parameters(),
                                                      lr=args.learn_lr)
        if learner.encoder is not None:
            optimizers["encoder"] = torch.optim.Adam(learner.encoder.parameters(), lr=args.lstm_lr)
            schedulers["encoder"] = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizers["encoder"], T_max=T, eta_min=MIN_LSTM_LR)
        if learner.task_info_mlp is not None:
            optimizers["task_info"] = torch.optim.Adam(learner.task_info_mlp.parameters(),
                                                       lr=args.task_info_lr)
        if learner.loss_network is not None:
            optimizers["loss_network"] = torch.optim.Adam(
                learner.loss_network.parameters(), lr=args.loss_lr,
                weight_decay=args.loss_weight_decay)
        return optimizers, schedulers

    # --- one outer step ----------------------------------------------------------------
    def outer_loss(self, batch, iteration):
        """The meta-objective of a batch: the MAML++ importance-weighted sum of every
        step's query loss while iteration < multi_step_loss_num_epochs, else the last
        step's; averaged over tasks.  Also returns the target predictions [T, Q]."""
        args = self.args
        J = args.num_inner_steps
        multi_step = args.use_multi_step and iteration < args.multi_step_loss_num_epochs
        query_steps = range(J) if multi_step else (J - 1,)
        query_losses, predictions = self.learner(batch, query_steps, first_order=args.first_order,
                                                 use_vmap=args.use_vmap)
        if multi_step:
            weights = importance_vector(iteration, J, args.multi_step_loss_num_epochs)
            return (query_losses * weights.to(query_losses)).sum(dim=1).mean(), predictions
        return query_losses[:, -1].mean(), predictions

    def train_step(self, batch):
        """One outer update of every meta-parameter on a batch of tasks. Under torchrun each
        process adapts its share of the batch and the gradients are summed over them."""
        self.iteration += 1
        self.learner.train()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        # the batch mean of the outer loss, accumulated over passes of at most
        # --tasks_per_pass tasks: the same gradient, a smaller graph at a time
        start, stop = distributed.share(len(batch))
        predictions = [batch.target_ratings[:0].cpu()]   # [0, Q]: a process may have no task
        loss_sum = 0.0
        tasks_per_pass = self.args.tasks_per_pass or len(batch)
        for first in range(start, stop, tasks_per_pass):
            tasks = batch[first:min(first + tasks_per_pass, stop)]
            loss, task_predictions = self.outer_loss(tasks, self.iteration)
            (loss * len(tasks) / len(batch)).backward()
            loss_sum += loss.item() * len(tasks)
            predictions.append(task_predictions.detach().cpu())
        loss_sum = distributed.sum_over_ranks(loss_sum)
        if not math.isfinite(loss_sum):
            self._stop_diverged(f"the meta-loss became {loss_sum / len(batch)}")
        distributed.all_reduce_gradients(p for p in self.learner.parameters() if p.requires_grad)
        torch.nn.utils.clip_grad_norm_(self.learner.model.parameters(), max_norm=GRADIENT_CLIP_NORM)
        for optimizer in self.optimizers.values():
            optimizer.step()
        for scheduler in self.schedulers.values():
            scheduler.step()
        predictions = distributed.gather(torch.cat(predictions))
        return evaluation.evaluate(predictions, batch.target_ratings, batch.query_row_mask)

    # --- evaluation ----------------------------------------------------------------------
    def evaluate(self, batch):
        """Adapt to each task (no outer graph) and score the final-step target predictions;
        under torchrun each process adapts its share of the users."""
        self.learner.eval()
        start, stop = distributed.share(len(batch))
        predictions = [batch.target_ratings[:0].cpu()]
        with torch.no_grad():
            for first in range(start, stop, EVALUATION_CHUNK):
                chunk = batch[first:min(first + EVALUATION_CHUNK, stop)].to(self.device)
                _, chunk_predictions = self.learner(chunk, (self.args.num_inner_steps - 1,),
                                                    first_order=True, use_vmap=self.args.use_vmap)
                predictions.append(chunk_predictions.cpu())
        return evaluation.evaluate(distributed.gather(torch.cat(predictions)), batch.target_ratings,
                                   batch.query_row_mask, rating_values=self.data.rating_values, users=batch.users)

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self):
        return {
            "method": self.method,
            "iteration": self.iteration,
            "best_valid_rmse": self.best_valid_rmse,
            "best_step": self.best_step,
            "learner": self.learner.state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()},
            "sampler": self.sampler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "args": vars(self.args),
            "identity": run_identity(self.args),
        }

    def save(self, best):
        if not distributed.is_main():
            return
        pattern = self.best_pattern if best else self.every_pattern
        atomic_save(self.state_dict(), self.save_dir / pattern.format(step=self.iteration))

    def load(self, step, best, resume):
        """Load a checkpoint: only the learner to test it, everything to resume training."""
        pattern = self.best_pattern if best else self.every_pattern
        made_by = f"main.py with --log_dir={self.args.log_dir} and the same --model/--mode/method"
        state = load_checkpoint(self.save_dir, pattern, step, self.device, made_by)
        check_identity(state.get("identity", {}), self.args, f"checkpoint of step {step}",
                       "it belongs to another run: give that run's flags, or another --log_dir")
        changed = self._changed_settings(state["args"], step) if resume else []
        load_matching_state(self.learner, state["learner"], f"checkpoint of step {step}", made_by)
        if not resume:
            return
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        if changed:
            self._apply_rates(state["iteration"])
        self.iteration = state["iteration"]
        self.best_valid_rmse = state["best_valid_rmse"]
        self.best_step = state["best_step"]
        self.sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _changed_settings(self, saved, step):
        """The flags that differ from the checkpoint's: an error for one that may not change,
        printed for the others (returned)."""
        ours = vars(self.args)
        differs = [name for name in saved if name in ours and saved[name] != ours[name] and name not in UNREAD_FLAGS]
        fixed = [name for name in differs if name not in MAY_CHANGE_ON_RESUME]
        if fixed:
            listed = ", ".join(f"--{name}={saved[name]} (now {ours[name]})" for name in fixed)
            raise UserError(f"--checkpoint_step={step} resumes a run made with other settings: {listed}; "
                            "these cannot change in a resumed run: give them as they were, or start a "
                            "new run in another --log_dir")
        changed = [name for name in differs if name not in ("checkpoint_step", "test")]
        if changed:
            print("Resuming with changed settings: " +
                  ", ".join(f"--{name} {saved[name]} -> {ours[name]}" for name in changed))
        return changed

    def _apply_rates(self, iteration):
        """Give the optimisers the learning rates of the command line, and the cosine
        schedules its length, at ``iteration``."""
        args = self.args
        ends = {"meta": args.min_outer_lr, "encoder": MIN_LSTM_LR}
        for name, optimizer in self.optimizers.items():
            rate = getattr(args, RATE_OF_OPTIMIZER[name])
            scheduler = self.schedulers.get(name)
            if scheduler is not None:
                scheduler.base_lrs = [rate] * len(optimizer.param_groups)
                scheduler.T_max, scheduler.eta_min = args.num_train_iterations, ends[name]
                # CosineAnnealingLR's closed form at this iteration
                rate = ends[name] + (rate - ends[name]) * (1 + math.cos(math.pi * iteration / scheduler.T_max)) / 2
            for group in optimizer.param_groups:
                group["lr"] = rate
                if name == "loss_network":
                    group["weight_decay"] = args.loss_weight_decay

    # --- the run -----------------------------------------------------------------------------
    def train(self):
        args = self.args
        make_dirs(self.save_dir)
        events = self.run_dir / "runs" / f"{args.model}_{args.mode}_{self.method}"
        if self.iteration == 0:
            refuse_earlier_run(self.save_dir, [self.every_pattern, self.best_pattern], args, self.method.upper())
            if distributed.is_main():
                shutil.rmtree(events, ignore_errors=True)  # a dead run's curves, which had no checkpoint
        valid_tasks = self.sampler.fixed_tasks("valid")
        # resumed: the curves after the checkpoint's iteration were a killed run's; drop them
        writer = distributed.summary_writer(str(events), purge_step=self.iteration + 1 if self.iteration else None)
        distributed.broadcast_parameters(self.learner)
        distributed.own_dropout_stream()
        print(f"Starting {self.method.upper()} training at iteration {self.iteration}")
        progress = tqdm(range(self.iteration + 1, args.num_train_iterations + 1),
                        initial=self.iteration, total=args.num_train_iterations, desc=self.method.upper(),
                        disable=not distributed.is_main())
        for _ in progress:
            batch = self.sampler.train_batch(args.batch_size).to(self.device)
            metrics = self.train_step(batch)
            progress.set_postfix(rmse=f"{metrics['rmse']:.4f}")
            tqdm.write(evaluation.format_metrics(f"Iteration {self.iteration}: ", metrics))
            log_metrics(writer, "train", metrics, self.iteration)
            if self.iteration % args.log_interval == 0 or self.iteration == args.num_train_iterations:
                self._validate(writer, valid_tasks, batch)
        writer.close()
        print_training_summary(self.best_step, self.best_valid_rmse, self.save_dir)
        evaluation.warn_if_worse_than_the_mean(self.best_valid_rmse, valid_tasks, self.data,
                                               "lower --inner_lr / --outer_lr / --lstm_lr")
        print("Done.")

    def _validate(self, writer, valid_tasks, train_batch):
        distributed.check_same_parameters(self.learner)
        metrics = self.evaluate(valid_tasks)
        tqdm.write(evaluation.format_metrics("\tValidation: ", metrics, label="Val "))
        if not evaluation.is_finite(metrics):
            self._stop_diverged(f"the validation RMSE became {metrics['rmse']}")
        log_metrics(writer, "valid", metrics, self.iteration)
        mean_rates = self.learner.inner_optimizer.rates_tensor().mean(dim=0)   # [J]
        for step, rate in enumerate(mean_rates.tolist()):
            writer.add_scalar(f"inner_lr/step_{step}", rate, self.iteration)
        for rating, weight in self.learner.mean_weight_per_rating(train_batch).items():
            writer.add_scalar(f"encoder_weight/rating_{rating}", weight, self.iteration)
        if metrics["rmse"] < self.best_valid_rmse:
            self.best_valid_rmse = metrics["rmse"]
            self.best_step = self.iteration
            self.save(best=True)
            tqdm.write(f"........Model saved (step: {self.best_step} | RMSE loss: {metrics['rmse']:.4f})")
        self.save(best=False)

    def _stop_diverged(self, what):
        """Stop the run on a non-finite number; nothing of this iteration is checkpointed."""
        steps = checkpoint_steps(self.save_dir, self.every_pattern)
        kept = (f"the last checkpoint (iteration {steps[-1]}) is kept and can be resumed with "
                f"--checkpoint_step={steps[-1]}" if steps else "no checkpoint was written")
        raise UserError(f"{what} at iteration {self.iteration}: the run stops, {kept}; lower "
                        "--outer_lr / --inner_lr / --lstm_lr")

    def test(self, step):
        test_tasks = self.sampler.fixed_tasks("test")
        metrics = self.evaluate(test_tasks)
        if not evaluation.is_finite(metrics):
            raise UserError(f"the test RMSE of the checkpoint of iteration {step} is {metrics['rmse']}: "
                            "its parameters do not give finite predictions; no result is written")
        if not distributed.is_main():
            return metrics
        pattern = self.best_pattern if self.args.test_best else self.every_pattern
        path = self.save_dir / test_results_name(pattern.format(step=step))
        # what the LSTM encoder makes of each rating: its mean loss weight on the test support sets
        weights = self.learner.mean_weight_per_rating(test_tasks.to(self.device)) or None
        evaluation.report_test(metrics, f"{self.method.upper()} test (step {step})", path, vars(self.args),
                               method=self.method, checkpoint_step=step, identity=run_identity(self.args),
                               encoder_weight_per_rating=weights)
        return metrics


def test_mean_rating(args, data):
    """The mean-rating baseline: predict the training users' mean rating for every target."""
    sampler = TaskSampler(data, TaskConfig.from_args(args))
    metrics = evaluation.mean_rating_metrics(sampler.fixed_tasks("test"), data)
    if not distributed.is_main():
        return metrics
    folder = run_folder(args, args.log_dir)
    make_dirs(folder)
    path = folder / mean_rating_results_name(args.mode)
    evaluation.report_test(metrics, f"Mean rating baseline ({data.train_mean_rating:.4f})", path, vars(args),
                           method="mean_rating", identity=run_identity(args))
    return metrics


def main(argv=None):
    args, device, data = setup(argv)
    if args.test_baseline:
        return test_mean_rating(args, data)
    trainer = MetaTrainer(args, data, device)
    if args.test:
        pattern = trainer.best_pattern if args.test_best else trainer.every_pattern
        step = step_to_test(args, trainer.save_dir, pattern, "main.py (or give --log_dir)")
        trainer.load(step, best=args.test_best, resume=False)
        return trainer.test(step)
    if args.checkpoint_step > -1:
        trainer.load(args.checkpoint_step, best=False, resume=True)
        print(f"Resuming from iteration {trainer.iteration}")
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_cli(main)
