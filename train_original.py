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
    import start_quietly  # noqa: F401

import math
import shutil

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import distributed
import evaluation
from config import BasicConfig, ModelConfig, TaskConfig
from experiment import UserError, log_metrics, make_dirs, run_cli, setup
from learning_rates import encoder_rate_of_basic
from models import model_factory
from models.loss_weighting import TaskStateEncoder
from rating_loss import MAX_RATING, loss_scale, rating_errors
from run_files import RunFiles, load_matching_state
from tasks import PretrainDataset, TaskSampler

PREDICTION_CHUNK = 4096  # sequences per forward call when predicting


class BasicTrainer:
    def __init__(self, args, data, device):
        """``args``: the flags, to build the configs and the run's files, and kept in the checkpoints."""
        self.args = args
        self.config = config = BasicConfig.from_args(args)
        self.data = data
        self.device = device
        self.model_config = ModelConfig.from_args(args, data.num_items)
        self.model = model_factory(self.model_config).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.pretraining_lr)
        # --use_learned_loss_baseline: weight the loss with the LSTM task-state encoder
        self.encoder = None
        if config.use_learned_loss_baseline:
            self.encoder = TaskStateEncoder(config.lstm_input_size, config.lstm_hidden,
                                            config.lstm_num_layers, use_softmax=config.use_softmax).to(device)
            self.encoder_optimizer = torch.optim.Adam(self.encoder.parameters())
        self.loss_scale = loss_scale(config.normalize_loss)
        tasks = TaskConfig.from_args(args)
        self.sampler = TaskSampler(data, tasks)
        generator = torch.Generator().manual_seed(config.random_seed)
        self.train_loader = DataLoader(
            PretrainDataset(data, data.train_users, tasks, seed=config.random_seed),
            batch_size=config.pretraining_batch_size, shuffle=True, generator=generator)
        self.files = RunFiles(args, args.pretrain_log_dir, "basic")

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
        for items, ratings in tqdm(self.train_loader, desc="batches", leave=False, disable=not distributed.is_main()):
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
        config, events = self.config, self.files.events
        self.files.make()
        self.files.refuse_earlier_run("Basic")
        if distributed.is_main():
            for path in self.files.pretrained:
                path.unlink(missing_ok=True)  # an earlier run's, which this run replaces (or, if it fails, none)
            if config.save_pretrained:
                make_dirs(*(path.parent for path in self.files.pretrained))
            shutil.rmtree(events, ignore_errors=True)  # an earlier run's curves: this run replaces them
        writer = distributed.summary_writer(str(events))
        for module in (self.model, self.encoder):
            if module is not None:
                distributed.broadcast_parameters(module)
        distributed.own_dropout_stream()
        valid_tasks = self.sampler.fixed_tasks("valid")
        best_rmse, best_epoch = math.inf, 0
        print(f"Starting Basic model training ({self.model_config.model}, {config.pretrain_epochs} epochs)")
        for epoch in tqdm(range(1, config.pretrain_epochs + 1), desc="epochs", disable=not distributed.is_main()):
            train_metrics = self.train_epoch(epoch)
            tqdm.write(evaluation.format_metrics(f"Epoch {epoch}: ", train_metrics))
            valid_metrics = self.evaluate(valid_tasks)
            tqdm.write(evaluation.format_metrics("\tValidation: ", valid_metrics, label="Val "))
            if not (evaluation.is_finite(train_metrics) and evaluation.is_finite(valid_metrics)):
                kept = f"the checkpoint of epoch {best_epoch} is kept" if best_epoch else "nothing was saved"
                raise UserError(f"Basic training diverged at epoch {epoch} (train RMSE {train_metrics['rmse']}, "
                                f"valid RMSE {valid_metrics['rmse']}); {kept}; lower --pretraining_lr")
            for split, metrics in (("train", train_metrics), ("valid", valid_metrics)):
                log_metrics(writer, split, metrics, epoch)
            if valid_metrics["rmse"] < best_rmse:
                best_rmse, best_epoch = valid_metrics["rmse"], epoch
                self.save(epoch, valid_metrics["rmse"])
                tqdm.write(f"........Model saved (step: {epoch} | RMSE loss: {best_rmse:.4f})")
        writer.close()
        self.files.print_summary(best_epoch, best_rmse)
        if config.save_pretrained:
            print(f"Pretrained embedding: {self.files.pretrained[0]}")
        evaluation.warn_if_worse_than_the_mean(best_rmse, valid_tasks, self.data,
                                               "change --pretraining_lr or train longer")
        print("Done.")
        return best_epoch

    def save(self, epoch, valid_rmse):
        """The best epoch's checkpoint in state/ (always: every run can be tested) and,
        with --save_pretrained=True, the embedding and whole model for main.py."""
        if not distributed.is_main():
            return
        self.files.save({"model": self.model.state_dict(), "epoch": epoch, "valid_rmse": valid_rmse,
                         "args": vars(self.args)}, epoch)
        if self.config.save_pretrained:
            self.files.save_pretrained(self.model)

    def load(self, step):
        state = self.files.load(step, best=True, device=self.device)
        load_matching_state(self.model, state["model"], f"checkpoint of epoch {step}", self.files.made_by)

    def test(self, step):
        metrics = self.evaluate(self.sampler.fixed_tasks("test"))
        if not evaluation.is_finite(metrics):
            raise UserError(f"the test RMSE of the checkpoint of epoch {step} is {metrics['rmse']}: "
                            "its parameters do not give finite predictions; no result is written")
        if not distributed.is_main():
            return metrics
        return self.files.report_test(metrics, f"Basic test (epoch {step})", step)


def main(argv=None):
    args, device, data = setup(argv, output_dir=lambda args: args.pretrain_log_dir)
    trainer = BasicTrainer(args, data, device)
    if args.test:
        step = trainer.files.step_to_test()
        trainer.load(step)
        return trainer.test(step)
    return trainer.train()


if __name__ == "__main__":
    run_cli(main)
