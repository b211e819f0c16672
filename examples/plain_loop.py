"""Probe Adam in a plain PyTorch loop: the seed problem (SimpleNet 10→5→1, Gaussian data, MSE, lr 1e-3)."""

import torch

import alphalib

torch.manual_seed(0)
model = alphalib.SimpleNet()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = torch.nn.MSELoss()
data = alphalib.gaussian_regression()  # X, y ~ N(0, 1): 1000 samples, 10 features

with alphalib.AlphaProbe(model, loss_fn, optimizer) as probe:  # exact curvature ("hessian"), every step
    for epoch in range(5):
        for x, y in alphalib.loader(data, batch_size=32):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            probe.step((x, y), epoch=epoch)  # takes optimizer.step() itself and records alpha* on the step

df = probe.to_frame()  # one row per probed step
columns = ["step", "epoch", "loss", "slope", "curvature", "alpha_star", "ratio", "flag"]
print(df[columns].head(3).to_string(float_format="%.4g"))
print(alphalib.epoch_summary(df).to_string(float_format="%.4g"))  # per epoch: medians of alpha*, alpha*/lr, ...
