"""MELO and MAML meta-training of a sequential recommender, and testing.

    python main.py --model=bert4rec ...                          # MELO
    python main.py --model=bert4rec ... --use_adaptive_loss=False  # MAML
    python main.py ... --test --checkpoint_step=N                # test a checkpoint
    python main.py ... --checkpoint_step=N                       # resume training
"""
if __name__ == "__main__":  # Ctrl-C while the imports below load: a quiet exit 130
    from run import start_quietly  # noqa: F401

import contextlib
import math
import shutil

import torch
from tqdm import tqdm

from config import MetaRunConfig
from meta_learning import evaluation
from meta_learning.evaluation import log_metrics
from meta_learning.learning_rates import meta_learning_rates
from meta_learning.meta_gradient import MetaGradient
from meta_learning.meta_learner import MetaLearner
from meta_learning.tasks import TaskSampler
from models import model_factory
from run import checkpoints, distributed
from run.errors import Diverged, UserError, run_cli
from run.preemption import StopRequests
from run.progress import Progress
from run.pretrained import load_pretrained
from run.run_files import RunFiles
from run.start import setup

GRADIENT_CLIP_NORM = 5.0
EVALUATION_CHUNK = 64  # tasks adapted at once when there is no outer graph


class MetaTrainer:
    """Meta-training: the learner and its optimisers, the task sampler, the run's files and
    the step and best validation so far (all that a checkpoint holds: run/checkpoints.py)."""

    def __init__(self, run, data, device, pretrained=True):
        """``run``: its MetaRunConfig; ``pretrained``: start from Basic's files as the run's
        training says (a checkpoint to test holds every parameter)."""
        self.training = run.training
        self.data = data
        self.device = device
        self.sampler = TaskSampler(data, run.tasks)
        model = model_factory(run.model)
        if pretrained and run.training.start_from:
            load_pretrained(run.files, model, run.training.start_from)
        self.learner = MetaLearner(model, run.method).to(device)
        self.method = self.learner.method
        self.meta_gradient = MetaGradient(self.learner, compile=run.training.compile)
        self.files = RunFiles(run.files, self.method)
        self.optimizers = self._build_optimizers()
        self.iteration = 0
        self.best_valid_rmse = math.inf
        self.best_step = 0
        self.resumed_from = None      # --resume_from: the other run's checkpoint this one began from
        self.own_stream_restored = False   # a resumed process that got its own dropout stream back
        self.new_folder = True        # False when it goes on in its own folder (--checkpoint_step)

    def _build_optimizers(self):
        """Adam on θ, on the inner rates α, and on MELO's networks that are used; their rates
        are set at every step (meta_learning/learning_rates.py)."""
        learner, weight_decay = self.learner, self.training.loss_weight_decay
        modules = {"meta": learner.model,
                   "inner_lr": learner.inner_optimizer if learner.config.use_learnable_params else None,
                   "encoder": learner.encoder, "task_info": learner.task_info_mlp, "loss_network": learner.loss_network}
        return {name: torch.optim.Adam(module.parameters(), weight_decay=weight_decay if name == "loss_network" else 0)
                for name, module in modules.items() if module is not None}

    # --- one outer step ----------------------------------------------------------------
    def train_step(self, batch):
        """One outer update of every meta-parameter on a batch of tasks. Under torchrun each
        process adapts its share of the batch and the gradients are summed over them."""
        self.iteration += 1
        self.learner.train()
        rates = meta_learning_rates(self.training, self.iteration)
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = rates[name]
            optimizer.zero_grad(set_to_none=True)
        # the batch mean of the meta-loss, accumulated over passes of at most
        # --tasks_per_pass tasks: the same gradient, a smaller graph at a time
        start, stop = distributed.share(len(batch))
        predictions = [batch.target_ratings[:0].cpu()]   # [0, Q]: a process may have no task
        loss_sum = 0.0
        tasks_per_pass = self.training.tasks_per_pass or len(batch)
        for first in range(start, stop, tasks_per_pass):
            tasks = batch[first:min(first + tasks_per_pass, stop)]
            loss, task_predictions = self.meta_gradient(tasks, self.iteration, scale=len(tasks) / len(batch))
            loss_sum += loss.item() * len(tasks)
            predictions.append(task_predictions.cpu())
        loss_sum = distributed.sum_over_ranks(loss_sum)
        if not math.isfinite(loss_sum):
            self._stop_diverged(f"the meta-loss became {loss_sum / len(batch)}")
        distributed.all_reduce_gradients(p for p in self.learner.parameters() if p.requires_grad)
        torch.nn.utils.clip_grad_norm_(self.learner.model.parameters(), max_norm=GRADIENT_CLIP_NORM)
        for optimizer in self.optimizers.values():
            optimizer.step()
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
                predictions.append(self.learner.adapted_predictions(chunk).cpu())
        return evaluation.evaluate(distributed.gather(torch.cat(predictions)), batch.target_ratings,
                                   batch.query_row_mask, rating_values=self.data.rating_values, users=batch.users)

    # --- checkpoints -----------------------------------------------------------------------
    def save(self, best, **marks):
        state = checkpoints.training_state(self)   # on every process: each one's dropout stream
        if distributed.is_main():
            self.files.save({**state, **marks}, self.iteration, best)

    def load(self, step, best, resume):
        """Load a checkpoint: only the learner to test it, everything to resume training."""
        checkpoints.restore(self, self.files.load(step, best, self.device), step, resume)
        self.new_folder = not resume

    def start_from(self, path):
        """Go on from another run's checkpoint (other learning rates or length, say): its whole
        state, in this run's own folder; the checkpoints record where it began."""
        state = self.files.load_other(path, self.device)
        checkpoints.restore(self, state, state["iteration"], resume=True)
        self.resumed_from = str(path)
        print(f"Starting from iteration {self.iteration} of {path}")

    # --- the run -----------------------------------------------------------------------------
    def train(self):
        training = self.training
        if training.batch_size > len(self.data.train_users):
            raise UserError(f"--batch_size={training.batch_size} is more than the {len(self.data.train_users)} "
                            "training users: a batch would repeat users; lower it")
        self.files.make()
        with self.files.lock(), StopRequests() as stop:
            if self.new_folder:
                self.files.refuse_earlier_run(self.method.upper())
                if distributed.is_main():
                    shutil.rmtree(self.files.events, ignore_errors=True)  # a dead run's curves, which had no checkpoint
            valid_tasks = self.sampler.fixed_tasks("valid")
            # resumed: the curves after the checkpoint's iteration were a killed run's; drop them
            with contextlib.closing(distributed.summary_writer(
                    str(self.files.events), purge_step=None if self.new_folder else self.iteration + 1)) as writer:
                self._train_loop(valid_tasks, writer, stop)
        self.files.print_summary(self.best_step, self.best_valid_rmse)
        evaluation.warn_if_worse_than_the_mean(self.best_valid_rmse, valid_tasks, self.data,
                                               "lower --inner_lr / --outer_lr / --lstm_lr")
        print("Done.")

    def _train_loop(self, valid_tasks, writer, stop):
        """Outer iterations up to --num_train_iterations, validating every --log_interval, until
        done or asked to stop."""
        training = self.training
        distributed.broadcast_parameters(self.learner)
        if not self.own_stream_restored:
            distributed.own_dropout_stream()
        print(f"Starting {self.method.upper()} training at iteration {self.iteration}")
        self.progress = Progress(self.method.upper(), self.iteration + 1, training.num_train_iterations,
                                 shown=distributed.is_main())
        for _ in self.progress:
            batch = self.sampler.train_batch(training.batch_size).to(self.device)
            metrics = self.train_step(batch)
            self.progress.every_step(evaluation.format_metrics(f"Iteration {self.iteration}: ", metrics),
                                     rmse=f"{metrics['rmse']:.4f}")
            log_metrics(writer, "train", metrics, self.iteration)
            if self.iteration % training.log_interval == 0 or self.iteration == training.num_train_iterations:
                self._validate(writer, valid_tasks, batch)
            stop.stop_if_requested(self.iteration, f"iteration {self.iteration}", self._checkpoint_to_resume)
        if self.meta_gradient.compiled is not None:
            tqdm.write(f"Dynamo compiled {self.meta_gradient.graphs_compiled} graph(s) of the meta-gradient in "
                       f"this run, for {len(self.meta_gradient.graph_shapes)} batch shape(s)")

    def _checkpoint_to_resume(self):
        """The checkpoint of this step when the run is stopped (marked, not a validation's); its path."""
        self.save(best=False, preempted=True)
        return self.files.checkpoint(self.iteration, best=False)

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
        self.progress.validated(self.iteration, metrics["rmse"], self.best_valid_rmse, self.best_step)

    def _stop_diverged(self, what):
        """Stop the run on a non-finite number; nothing of this iteration is checkpointed."""
        steps = self.files.steps(best=False)
        kept = (f"the last checkpoint (iteration {steps[-1]}) is kept and can be resumed with "
                f"--checkpoint_step={steps[-1]}" if steps else "no checkpoint was written")
        raise Diverged(f"{what} at iteration {self.iteration}: the run stops, {kept}; lower "
                        "--outer_lr / --inner_lr / --lstm_lr")

    def test(self, step, best):
        """Test the loaded checkpoint of ``step`` (its best-validation one, or with ``best=False``
        the every-validation one) and write the results beside it."""
        test_tasks = self.sampler.fixed_tasks("test")
        metrics = self.evaluate(test_tasks)
        if not evaluation.is_finite(metrics):
            raise UserError(f"the test RMSE of the checkpoint of iteration {step} is {metrics['rmse']}: "
                            "its parameters do not give finite predictions; no result is written")
        if not distributed.is_main():
            return metrics
        # what the LSTM encoder makes of each rating: its mean loss weight on the test support sets
        weights = self.learner.mean_weight_per_rating(test_tasks.to(self.device)) or None
        # a best checkpoint's own validation RMSE: what reproduce.py's tuned variants choose by
        return self.files.report_test(metrics, f"{self.method.upper()} test (step {step})", step, best,
                                      encoder_weight_per_rating=weights,
                                      validation_rmse=self.best_valid_rmse if best else None,
                                      data_digest=self.data.digest)


def test_mean_rating(run, data):
    """The mean-rating baseline: predict the training users' mean rating for every target."""
    sampler = TaskSampler(data, run.tasks)
    metrics = evaluation.mean_rating_metrics(sampler.fixed_tasks("test"), data)
    if not distributed.is_main():
        return metrics
    files = RunFiles(run.files, "mean_rating")
    files.make()
    return files.report_test(metrics, f"Mean rating baseline ({data.train_mean_rating:.4f})", data_digest=data.digest)


def main(argv=None):
    args, device, data = setup(argv)
    run = MetaRunConfig.from_args(args, data.num_items)
    if args.test_baseline:
        return test_mean_rating(run, data)
    trainer = MetaTrainer(run, data, device, pretrained=not args.test)
    if args.test:
        step = trainer.files.step_to_test(args.test_best)
        trainer.load(step, best=args.test_best, resume=False)
        return trainer.test(step, args.test_best)
    if args.checkpoint_step > -1:
        trainer.load(args.checkpoint_step, best=False, resume=True)
        print(f"Resuming from iteration {trainer.iteration}")
    elif args.resume_from:
        trainer.start_from(args.resume_from)
    trainer.train()
    return trainer


if __name__ == "__main__":
    run_cli(main)
