"""Probe a Lightning Trainer: AlphaCallback takes the optimizer's step and logs alpha* to the trainer's loggers."""

import tempfile

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

import alphalib
from alphalib.integrations.lightning import AlphaCallback


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)  # the callback measures alpha* of this same loss: F.mse_loss(model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


torch.manual_seed(0)
callback = AlphaCallback(F.mse_loss, every=4)  # probe every 4th step
with tempfile.TemporaryDirectory() as logs:
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[callback],
        logger=L.pytorch.loggers.CSVLogger(logs),  # gets alpha/alpha_star, alpha/alpha_star_over_lr, ...
        log_every_n_steps=4,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), alphalib.loader(alphalib.gaussian_regression(), batch_size=32))

print(alphalib.epoch_summary(callback.to_frame()).to_string(float_format="%.4g"))
