"""Basic training of a sequential recommender on all training users (no meta-learning).

    python train_original.py --model=bert4rec ... --pretrain_epochs=40          # train
    python train_original.py --model=bert4rec ... --test --checkpoint_step=22   # test
    python train_original.py ... --save_pretrained=True   # also write the embedding and
                                                          # model that main.py starts from
    torchrun --standalone --nproc_per_node=2 train_original.py ...  # data parallel

Basic is tested on the same fixed test tasks as MAML and MELO: it predicts
the targets of their query sequences without adapting.
"""
if __name__ == "__main__":  # Ctrl-C while the imports below load: a quiet exit 130
    from run import start_quietly  # noqa: F401

import contextlib
import math
import shutil

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import BasicRunConfig
from meta_learning import evaluation
from meta_learning.evaluation import log_metrics
from meta_learning.learning_rates import encoder_rate_of_basic
from meta_learning.rating_loss import MAX_RATING, loss_scale, rating_errors
from meta_learning.tasks import PretrainDataset, TaskSampler
from models import model_factory
from models.loss_weighting import TaskStateEncoder
from run import checkpoints, distributed
from run.errors import UserError, run_cli
from run.preemption import StopRequests
from run.progress import Progress, bars_wanted
from run.pretrained import save_pretrained
from run.run_files import RunFiles, load_matching_state, pretrained_paths
from run.start import make_dirs, setup

PREDICTION_CHUNK = 4096  # sequences per forward call when predicting


class BasicTrainer:
    def __init__(self, run, data, device):
        """``run``: its BasicRunConfig."""
        self.config = config = run.basic
        self.data = data
        self.device = device
        self.model = model_factory(run.model).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.pretraining_lr)
        # --use_learned_loss_baseline: weight the loss with the LSTM task-state encoder
        self.encoder = None
        if config.use_learned_loss_baseline:
            self.encoder = TaskStateEncoder(config.lstm_input_size, config.lstm_hidden,
                                            config.lstm_num_layers, use_softmax=config.use_softmax).to(device)
            self.encoder_optimizer = torch.optim.Adam(self.encoder.parameters())
        self.loss_scale = loss_scale(config.normalize_loss)
        tasks = run.tasks
        self.sampler = TaskSampler(data, tasks)
        generator = torch.Generator().manual_seed(config.random_seed)
        self.train_loader = DataLoader(
            PretrainDataset(data, data.train_users, tasks, seed=config.random_seed),
            batch_size=config.pretraining_batch_size, shuffle=True, generator=generator)
        self.files = RunFiles(run.files, "basic")
        self.epoch, self.best_rmse, self.best_epoch = 0, math.inf, 0
        self.own_stream_restored = False   # a resumed process that got its own dropout stream back

    def parameters(self):
        return [*self.model.parameters(), *(self.encoder.parameters() if self.encoder is not None else ())]

    def train_epoch(self, epoch):
        """One pass over the training users: masked MSE over all real positions. Under
        torchrun every process loads the same batches, predicts its share of the rows, and
        the gradients are summed over the processes."""
        self.model.train()
        if self.encoder is not None:
            for group in self.encoder_optimizer.param_groups:
                group["lr"] = encoder_rate_of_basic(self.config, epoch)
        target_errors = []
        for items, ratings in tqdm(self.train_loader, desc="batches", leave=False,
                                   disable=not (distributed.is_main() and bars_wanted())):
            items, ratings = items.to(self.device), ratings.to(self.device)
            mask = (items != 0).float()
            real_positions = mask.sum()                                    # of the whole batch
            start, stop = distributed.share(len(items))
            items, ratings, mask = items[start:stop], ratings[start:stop], mask[start:stop]
            predictions = self.model(items)                                # [B, L]
            losses = rating_errors(predictions, ratings, self.loss_scale) * mask
            if self.encoder is not None:
                losses = losses * self.encoder(ratings, mask)
            loss = losses.sum() / real_positions
            self.optimizer.zero_grad(set_to_none=True)
            if self.encoder is not None:
                self.encoder_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_gradients(self.parameters())
            self.optimizer.step()
            if self.encoder is not None:
                self.encoder_optimizer.step()
            target_errors.append(((predictions[:, -1].detach() - ratings[:, -1] / MAX_RATING) * MAX_RATING).cpu())
        errors = distributed.gather(torch.cat(target_errors))
        mse = (errors ** 2).mean().item()
        return {"mse": mse, "rmse": math.sqrt(mse), "mae": errors.abs().mean().item()}

    def evaluate(self, tasks):
        """Predict the targets of the tasks' query sequences (no adaptation) and score them;
        under torchrun each process predicts its share of the users."""
        self.model.eval()
        num_tasks, num_queries, length = tasks.query_items.shape
        first, last = distributed.share(num_tasks)
        sequences = tasks.query_items[first:last].reshape(-1, length)
        with torch.no_grad():
            predictions = torch.cat([sequences[:0, 0].float(), *(  # [0] first: a process may have no user
                self.model(sequences[start:start + PREDICTION_CHUNK].to(self.device))[:, -1].cpu()
                for start in range(0, len(sequences), PREDICTION_CHUNK))])
        predictions = distributed.gather(predictions.reshape(last - first, num_queries))
        return evaluation.evaluate(predictions * MAX_RATING,
                                   tasks.target_ratings, tasks.query_row_mask,
                                   rating_values=self.data.rating_values, users=tasks.users)

    def train(self):
        config = self.config
        self.files.make()
        with self.files.lock(), StopRequests() as stop:
            if self.epoch == 0:
                self._start_afresh()
            valid_tasks = self.sampler.fixed_tasks("valid")
            with contextlib.closing(distributed.summary_writer(
                    str(self.files.events), purge_step=self.epoch + 1 if self.epoch else None)) as writer:
                for module in (self.model, self.encoder):
                    if module is not None:
                        distributed.broadcast_parameters(module)
                if not self.own_stream_restored:
                    distributed.own_dropout_stream()
                print(f"Starting Basic model training ({self.files.config.model}, {config.pretrain_epochs} epochs)")
                for epoch in Progress("Basic", self.epoch + 1, config.pretrain_epochs, unit="epoch",
                                      shown=distributed.is_main()):
                    self._train_and_validate(epoch, valid_tasks, writer)
                    stop.stop_if_requested(epoch, f"epoch {epoch}", self._checkpoint_to_resume)
        self.files.print_summary(self.best_epoch, self.best_rmse)
        if config.save_pretrained:
            print(f"Pretrained embedding: {pretrained_paths(self.files.config)['embedding']}")
        evaluation.warn_if_worse_than_the_mean(self.best_rmse, valid_tasks, self.data,
                                               "change --pretraining_lr or train longer")
        print("Done.")
        return self.best_epoch

    def _start_afresh(self):
        """A new run replaces an earlier run's pretrained files and curves (or, if it fails, leaves none)."""
        self.files.refuse_earlier_run("Basic")
        if distributed.is_main():
            pretrained = pretrained_paths(self.files.config).values()
            for path in pretrained:
                path.unlink(missing_ok=True)
            if self.config.save_pretrained:
                make_dirs(*(path.parent for path in pretrained))
            shutil.rmtree(self.files.events, ignore_errors=True)

    def _train_and_validate(self, epoch, valid_tasks, writer):
        train_metrics = self.train_epoch(epoch)
        self.epoch = epoch
        tqdm.write(evaluation.format_metrics(f"Epoch {epoch}: ", train_metrics))
        valid_metrics = self.evaluate(valid_tasks)
        tqdm.write(evaluation.format_metrics("\tValidation: ", valid_metrics, label="Val "))
        if not (evaluation.is_finite(train_metrics) and evaluation.is_finite(valid_metrics)):
            kept = f"the checkpoint of epoch {self.best_epoch} is kept" if self.best_epoch else "nothing was saved"
            raise UserError(f"Basic training diverged at epoch {epoch} (train RMSE {train_metrics['rmse']}, "
                            f"valid RMSE {valid_metrics['rmse']}); {kept}; lower --pretraining_lr")
        for split, metrics in (("train", train_metrics), ("valid", valid_metrics)):
            log_metrics(writer, split, metrics, epoch)
        if valid_metrics["rmse"] < self.best_rmse:
            self.best_rmse, self.best_epoch = valid_metrics["rmse"], epoch
            self.save(best=True)
            tqdm.write(f"........Model saved (step: {epoch} | RMSE loss: {self.best_rmse:.4f})")

    def _checkpoint_to_resume(self):
        """The checkpoint of this epoch when the run is stopped (marked, not a best one); its path."""
        self.save(best=False, preempted=True)
        return self.files.checkpoint(self.epoch, best=False)

    def save(self, best, **marks):
        """The checkpoint of this epoch: a best one in state/ (always: every run can be tested)
        and, with --save_pretrained=True, the embedding and whole model for main.py; with
        ``best=False`` the one a stopped run resumes from. Each holds all that a resume needs."""
        rng = checkpoints.rng_state()   # on every process: each one's dropout stream
        if not distributed.is_main():
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "epoch": self.epoch, "valid_rmse": self.best_rmse, "best_epoch": self.best_epoch,
                 "rng": rng, "loader": self.train_loader.generator.get_state(),
                 "sequences": self.train_loader.dataset.rng.bit_generator.state,
                 "args": dict(self.files.config.flags), "data_digest": self.data.digest, **marks}
        if self.encoder is not None:
            state.update(encoder=self.encoder.state_dict(), encoder_optimizer=self.encoder_optimizer.state_dict())
        self.files.save(state, self.epoch, best)
        if best and self.config.save_pretrained:
            save_pretrained(self.files.config, self.model)

    def load(self, step, resume=False):
        """Load a checkpoint: the model to test it; everything to resume training after its epoch."""
        state = self.files.load(step, best=not resume, device=self.device)
        checkpoints.check_changed_settings(state["args"], dict(self.files.config.flags), step, resume)
        checkpoints.check_same_data(state, self.data, f"the checkpoint of epoch {step}")
        load_matching_state(self.model, state["model"], f"checkpoint of epoch {step}", self.files.made_by)
        if not resume:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if self.encoder is not None:
            self.encoder.load_state_dict(state["encoder"])
            self.encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        self.epoch, self.best_rmse, self.best_epoch = state["epoch"], state["valid_rmse"], state["best_epoch"]
        self.own_stream_restored = checkpoints.restore_rng(state["rng"])
        self.train_loader.generator.set_state(state["loader"])
        self.train_loader.dataset.rng.bit_generator.state = state["sequences"]

    def test(self, step):
        metrics = self.evaluate(self.sampler.fixed_tasks("test"))
        if not evaluation.is_finite(metrics):
            raise UserError(f"the test RMSE of the checkpoint of epoch {step} is {metrics['rmse']}: "
                            "its parameters do not give finite predictions; no result is written")
        if not distributed.is_main():
            return metrics
        return self.files.report_test(metrics, f"Basic test (epoch {step})", step, data_digest=self.data.digest)


def main(argv=None):
    args, device, data = setup(argv, output_dir=lambda args: args.pretrain_log_dir)
    trainer = BasicTrainer(BasicRunConfig.from_args(args, data.num_items), data, device)
    if args.test:
        step = trainer.files.step_to_test()
        trainer.load(step)
        return trainer.test(step)
    if args.checkpoint_step > -1:
        trainer.load(args.checkpoint_step, resume=True)
        print(f"Resuming from epoch {trainer.epoch}")
    return trainer.train()


if __name__ == "__main__":
    run_cli(main)
