"""Basic training (train_original.py) end to end on small fixture data."""
import json
import math
import os

import pytest
import torch

from config import BasicRunConfig, ModelConfig
from fixtures import make_ratings_frame, run_dir, write_ratings
from models import model_factory
from options import parse_args
from run.atomic_files import load_checked
from run.errors import UserError
from run.start import setup
import train_original

TINY = ["--min_item=1", "--num_test_data=8", "--val_size=8", "--max_seq_len=8",
        "--num_query_set=2", "--bert_hidden_units=8", "--bert_num_blocks=1", "--bert_num_heads=2",
        "--pretraining_batch_size=16", "--lstm_hidden=8", "--lstm_input_size=4"]


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    return write_ratings(tmp_path_factory.mktemp("data") / "ratings.dat", "ml-1m",
                         num_users=60, num_items=30, seed=5)


def run(ratings_file, tmp_path, *extra):
    return train_original.main([f"--data_path={ratings_file}", *TINY,
                                f"--pretrain_log_dir={tmp_path}", *extra])


def test_train_save_pretrained_and_test_from_the_checkpoint(ratings_file, tmp_path):
    best_epoch = run(ratings_file, tmp_path, "--pretrain_epochs=2", "--save_pretrained=True")
    assert best_epoch in (1, 2)
    checkpoint = run_dir(tmp_path) / "state" / f"bert4rec_{best_epoch}_no_meta_best"
    assert checkpoint.is_file()

    embedding = load_checked(run_dir(tmp_path) / "embedding" / "bert4rec_embedding_ml-1m_8_1_2", weights_only=True)
    whole = load_checked(run_dir(tmp_path) / "pretrained" / "bert4rec_pretrained_ml-1m_8_1_2", weights_only=True)
    assert embedding["identity"] == whole["identity"] == load_checked(checkpoint, weights_only=False)["identity"]
    assert embedding["identity"]["random_seed"] == 222 and embedding["identity"]["model"] == "bert4rec"
    embedding, whole = embedding["state"], whole["state"]
    saved = load_checked(checkpoint, weights_only=False)["model"]
    # the pretrained files are the best epoch's model, and its embedding part alone
    assert set(embedding) == {"items.weight", "positions.weight"}
    assert torch.equal(embedding["items.weight"], saved["embedding.items.weight"])
    assert all(torch.equal(whole[k], saved[k]) for k in saved)
    num_items = embedding["items.weight"].shape[0] - 1
    model_factory(ModelConfig.from_args(parse_args([*TINY]), num_items)).embedding.load_state_dict(embedding)  # fits

    metrics = run(ratings_file, tmp_path, "--test", f"--checkpoint_step={best_epoch}")
    assert math.isfinite(metrics["rmse"]) and math.isfinite(metrics["mae"])
    assert metrics["num_users"] == 8
    assert sum(row["count"] for row in metrics["per_rating"].values()) == metrics["num_targets"]
    assert 8 <= metrics["num_targets"] <= 16
    record = json.loads((run_dir(tmp_path) / "state" / f"bert4rec_{best_epoch}_no_meta_best_test.json").read_text())
    assert record["metrics"]["rmse"] == pytest.approx(metrics["rmse"])
    assert record["config"]["pretrain_log_dir"] == str(tmp_path)


def test_training_lowers_the_valid_error_from_the_untrained_model(tmp_path, capsys):
    # every item has its own rating, which Basic can learn; an untrained model predicts
    # about 3 stars for everything
    frame = make_ratings_frame(num_users=60, num_items=30, seed=5)
    frame["rating"] = (frame["item"] % 5 + 1).astype(float)
    ratings_file = write_ratings(tmp_path / "ratings.dat", "ml-1m", frame)
    args, device, data = setup([f"--data_path={ratings_file}", *TINY, f"--pretrain_log_dir={tmp_path}",
                                "--pretrain_epochs=20", "--pretraining_lr=0.01"])
    trainer = train_original.BasicTrainer(BasicRunConfig.from_args(args, data.num_items), data, device)
    untrained = trainer.evaluate(trainer.sampler.fixed_tasks("valid"))["rmse"]
    best_epoch = trainer.train()
    best = load_checked(run_dir(tmp_path) / "state" / f"bert4rec_{best_epoch}_no_meta_best", weights_only=False)
    assert untrained > 1.2 and best["valid_rmse"] < 0.6
    assert "warning" not in capsys.readouterr().out  # it beat the mean rating


def test_learned_loss_baseline_trains_the_encoder_that_weights_the_loss(ratings_file, tmp_path):
    trained = {}
    for baseline in (False, True):
        args, device, data = setup([f"--data_path={ratings_file}", *TINY, f"--pretrain_log_dir={tmp_path / str(baseline)}",
                                    "--pretrain_epochs=1", f"--use_learned_loss_baseline={baseline}"],
                                   output_dir=lambda args: args.pretrain_log_dir)
        trainer = train_original.BasicTrainer(BasicRunConfig.from_args(args, data.num_items), data, device)
        if baseline:
            initial = [p.detach().clone() for p in trainer.encoder.parameters()]
        trainer.train()
        trained[baseline] = trainer.model.state_dict()
    assert any(not torch.equal(before, after) for before, after in zip(initial, trainer.encoder.parameters()))
    weights = trained[False]["embedding.items.weight"], trained[True]["embedding.items.weight"]
    assert (weights[0] - weights[1]).abs().max() > 1e-6   # the weighted loss trained another model


def test_a_missing_epoch_lists_the_epochs_that_exist(ratings_file, tmp_path):
    run(ratings_file, tmp_path, "--pretrain_epochs=1")
    with pytest.raises(UserError, match=r"no checkpoint .* for step 22; steps with a checkpoint: 1$"):
        run(ratings_file, tmp_path, "--test", "--checkpoint_step=22")


def test_a_checkpoint_of_another_model_size_belongs_to_another_run(ratings_file, tmp_path):
    run(ratings_file, tmp_path, "--pretrain_epochs=1")
    with pytest.raises(UserError, match="holds runs of other data or settings"):
        run(ratings_file, tmp_path, "--test", "--checkpoint_step=1", "--bert_hidden_units=12")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_log_folder_is_a_clear_error(ratings_file, tmp_path):
    tmp_path.chmod(0o500)
    with pytest.raises(UserError, match="cannot write"):
        run(ratings_file, tmp_path / "sub", "--pretrain_epochs=1")


def test_a_log_folder_that_is_a_file_is_a_clear_error(ratings_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write"):
        run(ratings_file, blocker, "--pretrain_epochs=1")


def test_bad_input_exits_with_one_line(ratings_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_original.run_cli(lambda: run(tmp_path / "missing.dat", tmp_path))
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "missing.dat" in error and "\n" not in error


def test_diverging_basic_training_is_an_error_and_saves_nothing(ratings_file, tmp_path):
    with pytest.raises(UserError, match="Basic training diverged at epoch 1 .* nothing was saved; lower --pretraining_lr"):
        run(ratings_file, tmp_path, "--pretrain_epochs=3", "--pretraining_lr=1e30", "--save_pretrained=True")
    assert not list(tmp_path.glob("*/state/*")) and not list(tmp_path.glob("*/embedding/*"))


def test_a_second_basic_run_refuses_the_first_ones_files_unless_told_to_overwrite(ratings_file, tmp_path):
    run(ratings_file, tmp_path, "--pretrain_epochs=2", "--save_pretrained=True")
    with pytest.raises(UserError, match="earlier Basic run with these settings .*--overwrite=True"):
        run(ratings_file, tmp_path, "--pretrain_epochs=1", "--save_pretrained=True")
    best = run(ratings_file, tmp_path, "--pretrain_epochs=1", "--save_pretrained=True", "--overwrite=True")
    assert best == 1
    assert sorted(p.name for p in (run_dir(tmp_path) / "state").glob("*_best")) == ["bert4rec_1_no_meta_best"]
