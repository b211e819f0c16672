"""Lightning's callback and Hugging Face's Trainer: the records of a hand-written probed loop, training unchanged."""

from __future__ import annotations

import importlib
import logging
import math
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import alphalib
from alphalib import AlphaProbe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

MEASURED = ("loss", "slope", "curvature", "alpha_star")


def assert_same_records(got, want):
    """The same probed steps, with slope, curvature and alpha* equal to 1e-10 relative."""
    assert len(want) > 0
    assert [(r.step, r.epoch) for r in got] == [(r.step, r.epoch) for r in want]
    for g, w in zip(got, want, strict=True):
        for name in MEASURED:
            a, b = getattr(g, name), getattr(w, name)
            assert math.isfinite(b), (w.step, name, b)
            assert a == pytest.approx(b, rel=1e-10, abs=0), (w.step, name)


def assert_same_state(a: dict, b: dict):
    """Bit for bit: every tensor of two state dicts (nested, as optimizers keep them) is equal."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# ---- Lightning ------------------------------------------------------------------------------------------------


@pytest.fixture
def lightning():
    L = pytest.importorskip("lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return L


def regressor(L, *, dropout=0.0, optimizer="adam", scheduler=False, manual=False):
    """A float64 MLP as a LightningModule whose training_step is ``mse_loss(self(x), y)``."""

    class Regressor(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 1)).double()
            self.automatic_optimization = not manual

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self(x), y)

        def configure_optimizers(self):
            opt = (
                torch.optim.Adam(self.parameters(), lr=1e-2)
                if optimizer == "adam"
                else torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)
            )
            if scheduler:
                return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]
            return opt

    return Regressor()


def regression_loader(shuffle=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=shuffle)


def fit(L, module, loader, callbacks=(), *, epochs=2, acc=1, clip=None):
    trainer = L.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=acc,
        gradient_clip_val=clip,
        callbacks=list(callbacks),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("acc, every, module", [(1, 1, None), (2, 2, "net")])
def test_lightning_records_match_a_hand_written_loop(lightning, acc, every, module):
    from alphalib.integrations.lightning import AlphaCallback

    torch.manual_seed(0)
    trained = regressor(lightning)
    torch.manual_seed(0)
    by_hand = regressor(lightning)
    callback = AlphaCallback(F.mse_loss, every=every, module=module, tags={"run": "lightning"})
    fit(lightning, trained, regression_loader(), [callback], acc=acc)

    opt = by_hand.configure_optimizers()
    probe = AlphaProbe(by_hand if module is None else by_hand.net, F.mse_loss, opt, every=every)
    for epoch in range(2):
        batches = [tuple(b) for b in regression_loader()]
        for start in range(0, len(batches), acc):  # Lightning steps after the epoch's last batch too (5 = 2 + 2 + 1)
            group = batches[start : start + acc]
            opt.zero_grad()
            for x, y in group:
                (F.mse_loss(by_hand(x), y) / acc).backward()
            probe.step(group, epoch=epoch)
    probe.remove()

    assert_same_records(callback.records, probe.records)
    assert callback.probe.steps == probe.steps == 2 * math.ceil(5 / acc)
    assert set(callback.to_frame()["run"]) == {"lightning"}
    assert_same_state(trained.state_dict(), by_hand.state_dict())  # and the same trajectory


def test_lightning_hands_lbfgs_its_closure(lightning):
    from alphalib.integrations.lightning import AlphaCallback

    torch.manual_seed(0)
    trained = regressor(lightning, optimizer="lbfgs")
    torch.manual_seed(0)
    by_hand = regressor(lightning, optimizer="lbfgs")
    callback = AlphaCallback(F.mse_loss)
    fit(lightning, trained, regression_loader(), [callback], epochs=1)

    opt = by_hand.configure_optimizers()
    probe = AlphaProbe(by_hand, F.mse_loss, opt)
    for x, y in regression_loader():

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.mse_loss(by_hand(x), y)
            loss.backward()
            return loss

        probe.step((x, y), epoch=0, closure=closure)
    probe.remove()

    assert_same_records(callback.records, probe.records)
    assert {r.path for r in callback.records} == {"generic"}


def test_lightning_training_is_unchanged(lightning):
    """Dropout, a shuffled loader, accumulation, clipping, a scheduler: the same bits with the callback as without."""
    from alphalib.integrations.lightning import AlphaCallback

    def run(callbacks):
        torch.manual_seed(0)
        module = regressor(lightning, dropout=0.2, scheduler=True)
        trainer = fit(lightning, module, regression_loader(shuffle=True), callbacks, epochs=2, acc=2, clip=0.5)
        return module, trainer.optimizers[0], torch.get_rng_state()

    plain, plain_opt, plain_rng = run([])
    callback = AlphaCallback(F.mse_loss, every=1)
    probed, probed_opt, probed_rng = run([callback])

    assert len(callback.records) == 6 and all(r.flag != "error" for r in callback.records)
    assert_same_state(probed.state_dict(), plain.state_dict())
    assert_same_state(probed_opt.state_dict(), plain_opt.state_dict())
    assert torch.equal(probed_rng, plain_rng)
    # detached: no route left on the optimizer (the scheduler's own wrapper is back) and no hooks on the module
    assert "StepRoute" not in probed_opt.step.__qualname__ and getattr(probed_opt.step, "_wrapped_by_lr_sched", False)
    assert not probed._forward_pre_hooks and not probed._forward_hooks


@pytest.mark.parametrize(
    "case, message", [("manual", "manual optimization"), ("lbfgs_accumulating", "accumulate_grad_batches")]
)
def test_lightning_refuses_what_it_cannot_probe(lightning, case, message):
    from alphalib.integrations.lightning import AlphaCallback

    module = regressor(lightning, manual=case == "manual", optimizer="lbfgs" if case != "manual" else "adam")
    with pytest.raises(ValueError, match=message):
        fit(lightning, module, regression_loader(), [AlphaCallback(F.mse_loss)], acc=1 if case == "manual" else 2)


def test_lightning_logs_each_record_and_resumes_from_a_checkpoint(lightning, tmp_path):
    """Every probed step's α*, α*/lr, curvature and flag reach the trainer's logger (CSVLogger's metrics.csv); a
    fit resumed from a checkpoint goes on counting steps and keeps the earlier records, as an unbroken fit would."""
    import csv

    from alphalib.integrations.lightning import AlphaCallback

    def trainer(epochs, **kwargs):
        return lightning.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
            **kwargs,
        )

    torch.manual_seed(0)
    unbroken = AlphaCallback(F.mse_loss, every=3)
    logger = lightning.pytorch.loggers.CSVLogger(tmp_path, name="run")
    trainer(2, callbacks=[unbroken], logger=logger, enable_checkpointing=False).fit(
        regressor(lightning), regression_loader()
    )
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["alpha/alpha_star"]]
    assert [int(r["step"]) for r in rows] == [rec.step for rec in unbroken.records] == [0, 3, 6, 9]
    for row, rec in zip(rows, unbroken.records, strict=True):
        assert float(row["alpha/alpha_star"]) == pytest.approx(rec.alpha_star, rel=1e-12)
        assert float(row["alpha/alpha_star_over_lr"]) == pytest.approx(rec.ratio, rel=1e-12)
        assert float(row["alpha/curvature"]) == pytest.approx(rec.curvature, rel=1e-12)
        assert float(row["alpha/flagged"]) == float(rec.flag != "ok")

    torch.manual_seed(0)
    first, module = AlphaCallback(F.mse_loss, every=3), regressor(lightning)
    checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(1, callbacks=[first, checkpoint], logger=False).fit(module, regression_loader())
    resumed = AlphaCallback(F.mse_loss, every=3)
    trainer(2, callbacks=[resumed], logger=False, enable_checkpointing=False).fit(
        regressor(lightning), regression_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert resumed.probe.steps == unbroken.probe.steps == 10
    assert_same_records(resumed.records, unbroken.records)


# ---- Hugging Face --------------------------------------------------------------------------------------------


@pytest.fixture
def hf():
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def bert(transformers, dropout=0.0):
    """A tiny float64 BERT classifier: its loss stays in float64 (the LM losses cast logits to float32)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=16,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return transformers.BertForSequenceClassification(config).double()


def token_data():
    g = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(0, 16, (20, 8), generator=g), torch.randint(0, 3, (20,), generator=g)
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]


def training_args(transformers, path, **kwargs):
    options = dict(
        output_dir=str(path),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
        num_train_epochs=2,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(**{**options, **kwargs})


def quiet(trainer, transformers):
    trainer.remove_callback(transformers.PrinterCallback)
    return trainer


def summed(outputs, labels, num_items_in_batch=None):
    """A ``compute_loss_func`` normalized over the whole accumulated batch, as the Trainer's docs describe."""
    return F.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch


@pytest.mark.parametrize("acc, every, custom", [(1, 1, False), (2, 2, False), (2, 1, True)])
def test_hf_records_match_a_hand_written_loop(hf, tmp_path, acc, every, custom):
    from alphalib.integrations.hf import AlphaTrainer

    loss = alphalib.objective(lambda model, batch: model(**batch).loss)
    data = token_data()
    trained, by_hand = bert(hf), bert(hf)
    args = training_args(
        hf,
        tmp_path,
        gradient_accumulation_steps=acc,
        train_sampling_strategy="sequential",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    trainer = AlphaTrainer(
        model=trained,
        args=args,
        train_dataset=data,
        every=every,
        tags={"run": "hf"},
        optimizers=(torch.optim.Adam(trained.parameters(), lr=1e-2), None),
        compute_loss_func=summed if acc > 1 else None,
        objective=loss if custom else None,
    )
    quiet(trainer, hf).train()

    opt = torch.optim.Adam(by_hand.parameters(), lr=1e-2)
    probe = AlphaProbe(by_hand, loss, opt, every=every)
    batches = [hf.default_data_collator(data[i : i + 4]) for i in range(0, len(data), 4)]
    for epoch in range(2):
        for start in range(0, len(batches), acc):  # the Trainer's last step of an epoch takes what is left
            group = batches[start : start + acc]
            opt.zero_grad()
            for batch in group:
                (by_hand(**batch).loss / len(group)).backward()
            probe.step(group, epoch=epoch)
    probe.remove()

    assert_same_records(trainer.records, probe.records)
    assert trainer.probe.steps == probe.steps == 2 * math.ceil(5 / acc)
    assert set(trainer.to_frame()["run"]) == {"hf"}
    for a, b in zip(
        trained.parameters(), by_hand.parameters(), strict=True
    ):  # the same trajectory (the Trainer divides a sum
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)  # by the count where the hand takes a mean)


def test_hf_measures_the_loss_the_trainer_backpropagates(hf, tmp_path):
    """However the Trainer normalizes micro-batches, the measured loss's gradient is the one that stepped.

    The BERT classifier takes ``num_items_in_batch`` but returns a mean, and the Trainer then leaves it undivided:
    it backpropagates the sum of the micro-batch means. The probe measures that, not the mean over the union.
    """
    from alphalib.integrations.hf import AlphaTrainer

    class Grads(hf.TrainerCallback):
        def __init__(self):
            self.norms = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.norms.append(
                torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
                ).item()
            )

    grads = Grads()
    args = training_args(hf, tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.0, num_train_epochs=1)
    trainer = AlphaTrainer(model=bert(hf), args=args, train_dataset=token_data(), callbacks=[grads])
    quiet(trainer, hf).train()

    assert len(trainer.records) == len(grads.norms) == 3
    for rec, norm in zip(trainer.records, grads.norms, strict=True):
        assert rec.grad_norm == pytest.approx(norm, rel=1e-10)


def test_hf_training_is_unchanged(hf, tmp_path):
    """Dropout, shuffling, accumulation, clipping, the Trainer's own AdamW and schedule: the same bits either way."""
    from alphalib.integrations.hf import AlphaTrainer

    def run(cls, **kwargs):
        model = bert(hf, dropout=0.1)
        args = training_args(hf, tmp_path, gradient_accumulation_steps=2, learning_rate=1e-2, max_grad_norm=0.5)
        trainer = quiet(cls(model=model, args=args, train_dataset=token_data(), **kwargs), hf)
        trainer.train()
        return model, trainer, torch.get_rng_state()

    plain, plain_trainer, plain_rng = run(hf.Trainer)
    probed, trainer, probed_rng = run(AlphaTrainer, every=1)

    assert len(trainer.records) == 6 and all(r.flag != "error" for r in trainer.records)
    assert_same_state(probed.state_dict(), plain.state_dict())
    assert_same_state(trainer.optimizer.state_dict(), plain_trainer.optimizer.state_dict())
    assert torch.equal(probed_rng, plain_rng)
    # detached: the optimizer's step is its own again (as the plain run's), no hooks on the model
    assert "StepRoute" not in getattr(trainer.optimizer.step, "__qualname__", "StepRoute")
    assert vars(trainer.optimizer).keys() == vars(plain_trainer.optimizer).keys()
    assert not probed._forward_pre_hooks and not probed._forward_hooks


# ---- without the frameworks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, hidden, extra",
    [("lightning", ("lightning", "lightning.pytorch"), "lightning"), ("hf", ("transformers",), "hf")],
)
def test_a_missing_framework_names_the_extra(monkeypatch, module, hidden, extra):
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    monkeypatch.delitem(sys.modules, f"alphalib.integrations.{module}", raising=False)
    importlib.reload(importlib.import_module("alphalib.integrations"))  # the package itself needs neither
    with pytest.raises(ImportError, match=rf'pip install -c constraints.txt "alphalib\[{extra}\]"'):
        importlib.import_module(f"alphalib.integrations.{module}")


@pytest.mark.parametrize("framework", ["lightning", "hf"])
@pytest.mark.parametrize(
    "options, error",
    [({"every": 0}, ValueError), ({"curvature": "exact"}, ValueError), ({"probe_options": {"evry": 2}}, TypeError)],
)
def test_mistakes_raise_before_training(framework, options, error):
    if framework == "lightning":
        pytest.importorskip("lightning")
        from alphalib.integrations.lightning import AlphaCallback

        make = lambda: AlphaCallback(F.mse_loss, **options)  # noqa: E731
    else:
        pytest.importorskip("accelerate")
        pytest.importorskip("transformers")
        from alphalib.integrations.hf import AlphaTrainer

        make = lambda: AlphaTrainer(**options)  # noqa: E731  (raises before the Trainer needs a model)
    with pytest.raises(error):
        make()


def test_hf_log_history_carries_alpha_star(hf, tmp_path):
    """Each training log gets the records since the previous one: medians of α*, α*/lr and the curvature, and the
    flagged count, under alpha/ (what every report_to integration is sent)."""
    from alphalib.integrations.hf import AlphaTrainer

    args = training_args(hf, tmp_path, logging_strategy="steps", logging_steps=2, num_train_epochs=1)
    trainer = quiet(AlphaTrainer(model=bert(hf), args=args, train_dataset=token_data()), hf)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    records = trainer.records
    assert [h["step"] for h in logs] == [2, 4] and len(records) == 5
    for h, since in zip(logs, (records[0:2], records[2:4]), strict=True):
        ratios = sorted(r.ratio for r in since)
        assert h["alpha/alpha_star_over_lr"] == pytest.approx(sum(ratios) / 2, rel=1e-12)  # the median of two
        assert h["alpha/alpha_star"] == pytest.approx(sum(r.alpha_star for r in since) / 2, rel=1e-12)
        assert h["alpha/flagged"] == sum(r.flag != "ok" for r in since)
